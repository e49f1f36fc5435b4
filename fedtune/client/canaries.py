"""Gradient canaries in local training (data.canary_kind `gradient`, `fedtune audit`; Nasr et al. 2023,
"Tight Auditing of Differentially Private Machine Learning").

A gradient canary is a training record like any other, except that the gradient it contributes is
10·C·u_j instead of its own: u_j a random unit direction over the trained weights
(data/canaries.py::gradient_direction), C = dp.max_grad_norm. Under DP-SGD it replaces the record's
per-sample gradient before Opacus clips, sums and noises the batch, so the step treats it exactly as
it treats any record whose gradient is longer than C: clipped to C·u_j, and bounded by the
record-level ε. Ten times C, so that a step that failed to clip would show it tenfold. Without DP it
is added, as one record's share of the batch's mean gradient, to the record's own. Either way an
update that trained on canary j moves along −u_j, a direction ordinary data hardly moves along, which
is what gives the audit its power. Planted in simulation only: a deployed client has no canaries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.data.canaries import gradient_direction

RECORD_INDEX = "record_index"  # batch key: each row's index in the client's training data
CANARY_GRADIENT_SCALE = 10.0  # a gradient canary's norm, in units of C: clipping must cut it to C


class Indexed(Dataset):
    """`data` whose items also carry their index, for `indexed_collate`."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.data[index], index


def indexed_collate(collate: Callable[[Sequence[Any]], dict]) -> Callable[[Sequence[tuple[Any, int]]], dict]:
    """`collate` over Indexed items, with the rows' indices under RECORD_INDEX."""
    def collate_indexed(items: Sequence[tuple[Any, int]]) -> dict:
        batch = collate([item for item, _ in items])
        batch[RECORD_INDEX] = torch.tensor([index for _, index in items])
        return batch
    return collate_indexed


@lru_cache(maxsize=1024)
def _direction(seed: int, canary: int, size: int) -> torch.Tensor:
    return torch.from_numpy(gradient_direction(seed, canary, size))


@dataclass(frozen=True)
class GradientCanaries:
    """The gradient canaries among one client's training records."""

    rows: tuple[int, ...]  # per training record: the canary it is, or -1
    seed: int  # the run seed: the directions follow from it
    norm: float  # the norm of the gradient each canary contributes (DP-SGD then clips it to C)

    def inject(self, params: Sequence[torch.nn.Parameter], record_index: torch.Tensor, per_sample: bool) -> None:
        """After backward() on the batch whose rows are `record_index`: under DP-SGD (`per_sample`),
        each canary row's per-sample gradient becomes norm·u_j; without DP, norm·u_j / (batch rows) is added
        to the batch's mean gradient."""
        present = [(row, self.rows[index]) for row, index in enumerate(record_index.tolist()) if self.rows[index] >= 0]
        if not present:
            return
        sizes = [p.numel() for p in params]
        for row, canary in present:
            chunks = (_direction(self.seed, canary, sum(sizes)) * self.norm).split(sizes)
            for p, chunk in zip(params, chunks, strict=True):
                chunk = chunk.view_as(p).to(p.device, p.dtype)
                if per_sample:
                    if p.grad_sample.dtype != p.dtype:  # as PrivateTraining.upcast_grad_samples: clip in fp32
                        p.grad_sample = p.grad_sample.to(p.dtype)
                    p.grad_sample[row] = chunk
                elif p.grad is None:
                    p.grad = chunk / len(record_index)
                else:
                    p.grad.add_(chunk / len(record_index))
