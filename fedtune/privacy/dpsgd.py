"""Attach Opacus DP-SGD to one client's local training, continuing its privacy history.

Mostly wiring: Opacus' PrivacyEngine does the per-sample gradients, clipping and noise, and its
UniformWithReplacementSampler the Poisson sampling; the accountant is restored from the client's
saved history first, so the engine's steps add to what the client has already spent. What Opacus
leaves to the training loop (empty batches, physical batches, the bf16 upcast, which steps were
real) is PrivateTraining's, so client/train.py runs the same loop with or without DP.

Two things are wired by hand, each for a reason the analysis depends on:
- Randomness. DP-SGD's proof assumes the noise is independent of which records were sampled.
  Sampling, noise and dropout each get their own generator (RoundSeeds): secret OS randomness by
  default, three streams derived from one seed with reproducible noise. Opacus would otherwise draw
  the Poisson sampling from torch's global generator, which the caller also seeds.
- The Poisson schedule. Opacus' DPDataLoader runs int(1/q) steps, which for about 6% of batch
  counts k is k-1 (1/(1/k) < k in floating point), and then accounts q = 1/(k-1). The loader here
  runs exactly the (q, steps) that privacy/budget.py forecasts, and Opacus accounts that q.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import wrap_data_loader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset

from fedtune.config import DPConfig
from fedtune.privacy.accountant import History, make_accountant, normalize
from fedtune.privacy.budget import poisson_schedule

STREAMS = ("sampling", "noise", "model")


@dataclass(frozen=True)
class RoundSeeds:
    """Seeds of one round's three random streams: Poisson sampling, DP noise, and the model's own
    randomness (dropout). Each is drawn or derived separately, so none predicts another."""

    sampling: int
    noise: int
    model: int

    @classmethod
    def secret(cls) -> RoundSeeds:
        """From the operating system's secure randomness; never sent anywhere."""
        return cls(*(secrets.randbits(63) for _ in STREAMS))

    @classmethod
    def derived(cls, seed: int) -> RoundSeeds:
        """Reproducible research runs: each stream's seed is SHA-256 of (seed, stream name). Anyone
        who knows `seed` (the server does) can regenerate the noise."""
        return cls(*(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1
                     for name in STREAMS))

    def generator(self, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(getattr(self, stream))


@dataclass
class PrivateTraining:
    """One round of DP-SGD behind the interface client/train.py trains through (its PlainTraining
    is the same without DP): iterate batches(), run forward and backward on each, call step().
    The phases Opacus leaves to its caller live here: empty Poisson batches, physical batches,
    the fp32 upcast of per-sample gradients, telling a real step from an accumulating one, and the
    privacy history the steps are added to."""

    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    hooks: Any  # Opacus GradSampleHooks; .cleanup() removes them from the shared model
    sample_rate: float
    physical_batch_size: int = 0  # 0: each Poisson batch in one forward pass
    steps: int = 0  # logical steps taken: each noised and counted by the accountant

    @property
    def history(self) -> History:
        return normalize(self.engine.accountant.history)

    def close(self) -> None:
        self.hooks.cleanup()

    def batches(self) -> Iterator[Any]:
        """One epoch of Poisson batches, each split into physical batches of at most
        dp.physical_batch_size. An empty draw is stepped on here (noise only) and not yielded."""
        for batch in self._physical_batches():
            if batch is None:
                step_on_empty_batch(self.optimizer)
                self.steps += 1
            else:
                yield batch

    def _physical_batches(self) -> DataLoader:
        """Opacus' BatchMemoryManager without the context manager: its __enter__ returns this
        loader and its __exit__ does nothing. The optimizer then steps once per logical batch."""
        if not self.physical_batch_size:
            return self.loader
        return wrap_data_loader(data_loader=self.loader, max_batch_size=self.physical_batch_size,
                                optimizer=self.optimizer)

    def step(self) -> None:
        """After backward(): clip, noise and step, or, for a physical batch that is not the last of
        its logical batch, only clip and accumulate."""
        self.upcast_grad_samples()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Opacus tells a real step from an accumulating one only by this private attribute, set by
        # DPOptimizer.pre_step: True when BatchMemoryManager signalled that more of the logical batch follows.
        if not self.optimizer._is_last_step_skipped:
            self.steps += 1

    def upcast_grad_samples(self) -> None:
        """Between backward() and the optimizer's step (step() calls it). Under bf16 autocast
        (model.device `cuda`), Opacus 1.6 stores bf16 per-sample gradients and computes their norms and
        clip factors in bf16, so a clipped gradient measured up to 0.7% above C here: more than the
        noise is calibrated for.
        In the parameters' fp32, clipping holds as without autocast. A no-op when dtypes match.
        Each is one tensor: under Poisson sampling Opacus refuses a second backward pass before a step."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                sample = getattr(p, "grad_sample", None)
                if isinstance(sample, torch.Tensor) and sample.dtype != p.dtype:
                    p.grad_sample = sample.to(p.dtype)


def _collate_or_empty(collate: Callable[[Sequence[Any]], Any], items: Sequence[Any]) -> Any:
    return collate(items) if items else None  # None: Poisson sampling drew no record this step


def poisson_loader(data: Dataset, batch_size: int, collate: Callable[[Sequence[Any]], Any],
                   generator: torch.Generator) -> DataLoader:
    """One epoch of Poisson batches at the schedule privacy/budget.py forecasts: k = ceil(n / B)
    steps, each record joining each step independently with probability q = 1/k. An empty draw
    is yielded as None (the step still happens: see step_on_empty_batch)."""
    q, steps = poisson_schedule(len(data), batch_size, epochs=1)
    sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=q, generator=generator, steps=steps)
    return DataLoader(data, batch_sampler=sampler, collate_fn=partial(_collate_or_empty, collate))


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, batch_size: int,
                 collate: Callable[[Sequence[Any]], Any], dp: DPConfig, history: History,
                 seeds: RoundSeeds) -> PrivateTraining:
    """DP-SGD around `model` (not wrapped: the cached model stays usable) over Poisson batches of
    `data`, with sampling and noise from their own generators. Leaves the model in training mode,
    which Opacus requires."""
    model.train()
    device = next(model.parameters()).device
    loader = poisson_loader(data, batch_size, collate, seeds.generator("sampling"))
    engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant = make_accountant(dp.accountant, history)
    # poisson_sampling=False: the loader already samples by Poisson; Opacus then accounts
    # q = 1 / len(loader), which is exactly the loader's q.
    hooks, dp_optimizer, _ = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False, wrap_model=False, noise_generator=seeds.generator("noise", device),
    )
    hooks.forbid_grad_accumulation()  # as Opacus does for its own Poisson loader: one backward per step
    return PrivateTraining(dp_optimizer, loader, engine, hooks, 1.0 / len(loader), dp.physical_batch_size)


def step_on_empty_batch(optimizer: torch.optim.Optimizer) -> None:
    """Poisson sampling can draw an empty batch. The step must still happen (noise only, and
    counted by the accountant), so give every parameter an empty per-sample gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
