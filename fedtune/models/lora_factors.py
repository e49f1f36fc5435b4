"""LoRA factors at another rank, and FFA-LoRA's shared frozen A.

PEFT computes a LoRA module's update as (alpha / r) · B · A, with B of shape (out, r) and A of
shape (r, in). The functions here work on a payload (tensor name -> array, as on the wire) and
never change the update a module computes more than their docstrings say:

- `truncate`: the rank-ρ view of a rank-R payload, which the server sends a client of rank ρ:
  the first ρ rows of A and columns of B, with B rescaled by ρ/R so that the client's
  (alpha/ρ)·B_ρ·A_ρ is exactly those ρ components of the global (alpha/R)·B·A.
- `lift`: a client's rank-ρ reply read back at the global rank: its own components, rescaled by
  R/ρ, followed by the global's components ρ..R, which it never received and so did not change.
  Averaging lifted replies therefore averages updates zero-padded to the global rank (HetLoRA-style).
- `freeze_shared_a`: FFA-LoRA's A, derived from the run seed alone, and frozen.

Both directions assume PEFT's default scaling alpha / r (no rsLoRA, no per-module rank or alpha
patterns), which is how models/build.py and models/causal.py configure LoRA.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

LORA_A = ".lora_A."
LORA_B = ".lora_B."


def rank_axis(name: str) -> int | None:
    """The axis of a tensor that is the LoRA rank: 0 for an A (r, in), 1 for a B (out, r), else None."""
    if LORA_A in name:
        return 0
    if LORA_B in name:
        return 1
    return None


def ranks(shapes: Iterable[tuple[str, Sequence[int]]]) -> set[int]:
    """The LoRA ranks found among (name, shape) pairs: one value in a well-formed payload, none
    in a payload without LoRA tensors."""
    return {int(shape[axis]) for name, shape in shapes if (axis := rank_axis(name)) is not None and len(shape) == 2}


def payload_rank(state: Mapping[str, np.ndarray]) -> int | None:
    """The rank of a payload's LoRA tensors (None without any). Raises ValueError if they disagree."""
    found = ranks((name, value.shape) for name, value in state.items())
    if len(found) > 1:
        raise ValueError(f"LoRA tensors of several ranks in one payload: {sorted(found)}")
    return found.pop() if found else None


def truncate(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The rank-`rank` view of `state` (its own rank or lower); other tensors are unchanged."""
    current = payload_rank(state)
    if current is None or rank == current:
        return dict(state)
    if not 1 <= rank <= current:
        raise ValueError(f"cannot view a rank-{current} adapter at rank {rank}")
    out = {}
    for name, value in state.items():
        axis = rank_axis(name)
        if axis == 0:
            out[name] = value[:rank].copy()
        elif axis == 1:
            out[name] = (value[:, :rank] * (rank / current)).astype(value.dtype)
        else:
            out[name] = value
    return out


def lift(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` (a reply at rank ρ) at the rank R of `reference` (the global adapter it was cut from).

    The lifted module computes (alpha/R)·B_R·A_R = (alpha/ρ)·B·A + (alpha/R)·B_ref[:, ρ:]·A_ref[ρ:]:
    the client's own update plus the part of the global it was not sent. Non-LoRA tensors are the
    reply's own."""
    rank, full = payload_rank(state), payload_rank(reference)
    if rank is None or rank == full:
        return dict(state)
    if full is None or rank > full:
        raise ValueError(f"cannot lift a rank-{rank} reply to a rank-{full} adapter")
    out = {}
    for name, value in state.items():
        axis, ref = rank_axis(name), reference[name]
        if axis == 0:
            out[name] = np.concatenate([value, ref[rank:]], axis=0).astype(ref.dtype)
        elif axis == 1:
            out[name] = np.concatenate([value * (full / rank), ref[:, rank:]], axis=1).astype(ref.dtype)
        else:
            out[name] = value
    return out


def freeze_shared_a(model: torch.nn.Module, seed: int) -> None:
    """FFA-LoRA: set every lora_A to a value derived from `seed` alone, and freeze it.

    PEFT's own initialisation cannot serve: it draws from the global RNG, in construction order and
    on the layer's device, so the same seed may give another A on a GPU client than on the CPU
    server. Under ffa, A never crosses the wire, so every process must derive the same bits by
    itself. Each row j of a module's A comes from its own CPU generator seeded by (seed, tensor
    name, j): a client of rank ρ therefore holds exactly the first ρ rows of the global rank-R A.
    The distribution is PEFT's default, U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5))."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if LORA_A not in name:
                continue
            rank, fan_in = param.shape
            bound = 1.0 / math.sqrt(fan_in)
            rows = [torch.rand(fan_in, generator=torch.Generator().manual_seed(_row_seed(seed, name, j)))
                    for j in range(rank)]
            param.copy_(((torch.stack(rows) * 2 - 1) * bound).to(param.device, param.dtype))
            param.requires_grad_(False)


def _row_seed(seed: int, name: str, row: int) -> int:
    return zlib.crc32(f"ffa:{seed}:{name}:{row}".encode())
