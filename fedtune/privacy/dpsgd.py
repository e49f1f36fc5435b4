"""Attach Opacus DP-SGD to one client's local training, continuing its privacy history.

Mostly wiring: Opacus' PrivacyEngine does the per-sample gradients, clipping and noise, and its
UniformWithReplacementSampler the Poisson sampling; the accountant is restored from the client's
saved history first, so the engine's steps add to what the client has already spent. What Opacus
leaves to the training loop (empty batches, physical batches, the bf16 upcast, which steps were
real) is PrivateTraining's, so client/train.py runs the same loop with or without DP.

Two things are wired by hand, each for a reason the analysis depends on:
- Randomness. DP-SGD's proof assumes the noise is independent of which records were sampled.
  Sampling, noise, dropout, a user's records and distributed DP's rounding each get their own
  generator (RoundSeeds, STREAMS): secret OS randomness by default, all derived from one seed with
  reproducible noise, only the sampling with public streams. Opacus would otherwise draw
  the Poisson sampling from torch's global generator, which the caller also seeds.
- The Poisson schedule. Opacus' DPDataLoader runs int(1/q) steps, which for about 6% of batch
  counts k is k-1 (1/(1/k) < k in floating point), and then accounts q = 1/(k-1). The loader here
  runs exactly the (q, steps) that privacy/budget.py forecasts, and Opacus accounts that q.
- User-level DP-SGD (dp.unit `user`; Charles et al. 2024, "Fine-Tuning Large Language Models with
  User-Level Differential Privacy", user-level sampling). Poisson sampling draws users, not
  records; a sampled user brings at most dp.max_records_per_user of their records (a uniformly
  random subset when they have more, drawn from a stream of its own). Opacus computes per-record
  gradients, and before its clipping each user's are combined into one
  (PrivateTraining.combine_by_user), so Opacus clips, sums and noises one gradient per user, and its
  accountant counts q over users. Adding or removing one user changes the noised sum by at most C,
  the sensitivity the noise is calibrated to: the same Gaussian mechanism as record-level DP-SGD,
  with a user in place of a record (docs/privacy.md derives it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import wrap_data_loader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset

from fedtune.config import DPConfig
from fedtune.data.users import UserRecords
from fedtune.privacy.accountant import History, make_accountant, normalize
from fedtune.privacy.budget import poisson_schedule

STREAMS = ("sampling", "noise", "model", "records", "rounding")
# The streams dp.public_streams derives from the run seed; the others stay secret OS randomness under it. The
# noise is the mechanism itself. The other streams are drawn record after record (dropout masks through the
# model's stream, which records of a user, the rounding), so were one known, removing one record would change
# the draws, and so the contribution, of every record after it: the sum's sensitivity would no longer be one
# record's. Secret, each record's draws are fresh and independent of the others', and the analysis averages
# over them.
PUBLIC_STREAMS = ("sampling",)
ROUNDING_ROWS = 64  # distributed DP: records rounded to integers at a time (privacy/skellam.py)
USER_INDEX = "user_index"  # under dp.unit `user`: a batch's position of each record's user, not a model input


def round_seed(run_seed: int, server_round: int, client: str) -> int:
    """The seed a client derives one round's streams from when they are not secret (no DP,
    dp.reproducible_noise, dp.public_streams): the server, which knows the run seed, can derive it too.
    SHA-256, 63 bits: a 32-bit checksum here (as before) would give two (round, client) pairs the same
    streams about once in 10^5 pairs, and their noise would then be identical, not independent."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{server_round}:{client}".encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class RoundSeeds:
    """Seeds of one round's random streams: Poisson sampling, DP noise, the model's own randomness
    (dropout), and (dp.unit `user`) which k records of a sampled user a step uses. Each is drawn or
    derived separately, so none predicts another."""

    sampling: int
    noise: int
    model: int
    records: int
    rounding: int  # distributed DP: the randomized rounding of each record's gradient to integers

    @classmethod
    def secret(cls) -> RoundSeeds:
        """From the operating system's secure randomness; never sent anywhere."""
        return cls(*(secrets.randbits(63) for _ in STREAMS))

    @classmethod
    def derived(cls, seed: int) -> RoundSeeds:
        """Reproducible research runs: each stream's seed is SHA-256 of (seed, stream name). Anyone
        who knows `seed` (the server and every institution do) can regenerate the noise."""
        return cls(*(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1
                     for name in STREAMS))

    @classmethod
    def public(cls, seed: int) -> RoundSeeds:
        """dp.public_streams (a white-box audit): PUBLIC_STREAMS derived as with `derived(seed)`, the others
        secret OS randomness. At Poisson q = 1 the sampling takes every record whatever its stream holds, so
        the guarantee holds for every value of it (the analysis conditions on it): it may be known."""
        return dataclasses.replace(cls.derived(seed), **{stream: secrets.randbits(63) for stream in STREAMS
                                                          if stream not in PUBLIC_STREAMS})

    @classmethod
    def of_round(cls, dp: DPConfig, seed: int | None) -> RoundSeeds:
        """A round's seeds from its round seed (`round_seed`), or secret ones for None."""
        if seed is None:
            return cls.secret()
        return cls.public(seed) if dp.enabled and dp.public_streams else cls.derived(seed)

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
    user_gradient: str = ""  # dp.unit `user`: dp.user_gradient; empty: record-level
    steps: int = 0  # logical steps taken: each noised and counted by the accountant
    per_sample: bool = True  # backward() leaves per-sample gradients, which step() clips
    integer_share: IntegerShare | None = None  # distributed DP: the step's integer share of the sum
    _owners: torch.Tensor | None = field(default=None, init=False, repr=False)  # each record's user in the batch

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
                self._owners = batch.pop(USER_INDEX, None)
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
        self.zero_non_finite_records()
        if self.user_gradient:
            self.combine_by_user()
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


    def zero_non_finite_records(self) -> None:
        """A record whose per-sample gradient holds NaN or ∞ contributes a zero gradient instead (step()
        calls this before clipping). Opacus would scale it by C/∞ = 0, and 0·∞ is NaN, so the whole
        noised sum, and the update sent, would be NaN exactly when that record was sampled: weights
        chosen by a coordinator to overflow one record's logits would reveal its membership at
        ε = ∞. Zero is within the sensitivity C the noise covers: with or without the record, the
        sum moves by at most C (docs/privacy.md, "Non-finite gradients")."""
        samples = [p.grad_sample for group in self.optimizer.param_groups for p in group["params"]
                   if isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
        if not samples:
            return
        finite = torch.stack([torch.isfinite(s.reshape(len(s), -1)).all(dim=1) for s in samples]).all(dim=0)
        if not bool(finite.all()):
            for sample in samples:
                sample[~finite] = 0

    def combine_by_user(self) -> None:
        """Replace the per-record gradients of the batch by one gradient per user, which Opacus then
        clips to C, sums and noises. `mean`: the mean of the user's record gradients (the gradient of
        their mean loss); `clipped_mean`: the mean of those gradients each clipped to C first. Both
        are means, so a user's gradient does not grow with their record count."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]
                  if isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
        owners = self._owners.to(params[0].grad_sample.device)
        users = int(owners.max()) + 1
        weight = 1.0 / torch.bincount(owners, minlength=users).to(params[0].dtype)[owners]
        if self.user_gradient == "clipped_mean":
            norms = torch.stack([p.grad_sample.reshape(len(owners), -1).norm(2, dim=1) for p in params], dim=1)
            weight = weight * (self.optimizer.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        for p in params:
            sample = p.grad_sample
            combined = torch.zeros((users, *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
            p.grad_sample = combined.index_add_(0, owners, sample * weight.view(-1, *[1] * (sample.dim() - 1)))


def _collate_or_empty(collate: Callable[[Sequence[Any]], Any], items: Sequence[Any]) -> Any:
    return collate(items) if items else None  # None: Poisson sampling drew no record this step


def poisson_loader(data: Dataset, batch_size: int, collate: Callable[[Sequence[Any]], Any],
                   generator: torch.Generator, sample_rate: float = 0.0) -> DataLoader:
    """One epoch of Poisson batches at the schedule privacy/budget.py forecasts: k = ceil(n / B)
    steps, each record joining each step independently with probability q = 1/k; or, with a
    `sample_rate` q (train.sample_rate), one step at q. An empty draw is yielded as None (the step
    still happens: see step_on_empty_batch)."""
    q, steps = poisson_schedule(len(data), batch_size, 1, sample_rate)
    sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=q, generator=generator, steps=steps)
    return DataLoader(data, batch_sampler=sampler, collate_fn=partial(_collate_or_empty, collate))


def user_loader(data: UserRecords, batch_size: int, collate: Callable[[Sequence[Any]], Any], max_records: int,
                generator: torch.Generator, records_generator: torch.Generator, sample_rate: float = 0.0) -> DataLoader:
    """One epoch of Poisson batches of users (drawn from `generator`), at the schedule
    privacy/budget.py forecasts for n = the number of users and batch_size users a step. A sampled
    user with more than `max_records` records brings a uniformly random `max_records` of them (drawn
    from `records_generator`). An empty draw is yielded as None."""
    return poisson_loader(data, batch_size, partial(_collate_users, data.records, collate, max_records,
                                                    records_generator), generator, sample_rate)


def _collate_users(records: Dataset, collate: Callable[[Sequence[Any]], Any], max_records: int,
                   generator: torch.Generator, sampled: Sequence[tuple[int, ...]]) -> Any:
    """The records of the sampled users (at most max_records each) as one batch, with USER_INDEX."""
    items, owners = [], []
    for slot, positions in enumerate(sampled):
        if len(positions) > max_records:
            keep = torch.randperm(len(positions), generator=generator)[:max_records].sort().values
            positions = tuple(positions[i] for i in keep.tolist())
        items += [records[p] for p in positions]
        owners += [slot] * len(positions)
    batch = collate(items)
    batch[USER_INDEX] = torch.tensor(owners)
    return batch


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, batch_size: int,
                 collate: Callable[[Sequence[Any]], Any], dp: DPConfig, history: History,
                 seeds: RoundSeeds, sample_rate: float = 0.0) -> PrivateTraining:
    """DP-SGD around `model` (not wrapped: the cached model stays usable) over Poisson batches of
    `data`, with sampling and noise from their own generators. `data` grouped by user (UserRecords):
    user-level DP-SGD, which samples users and clips each one's gradient. `sample_rate` q > 0
    (train.sample_rate): one step at q. Leaves the model in training mode, which Opacus requires."""
    model.train()
    device = next(model.parameters()).device
    by_user = isinstance(data, UserRecords)
    if by_user:
        loader = user_loader(data, batch_size, collate, dp.max_records_per_user, seeds.generator("sampling"),
                             seeds.generator("records"), sample_rate)
    else:
        loader = poisson_loader(data, batch_size, collate, seeds.generator("sampling"), sample_rate)
    engine = PrivacyEngine(accountant="rdp")  # replaced at once: Opacus' registry knows only its own kinds
    engine.accountant = make_accountant(dp.accounting, history)
    # poisson_sampling=False: the loader already samples by Poisson; Opacus then accounts
    # q = 1 / len(loader), which is exactly the loader's q.
    hooks, dp_optimizer, _ = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False, wrap_model=False, noise_generator=seeds.generator("noise", device),
    )
    hooks.forbid_grad_accumulation()  # as Opacus does for its own Poisson loader: one backward per step
    # Opacus divides the noised sum by int(n·q), which floating point makes 0 for some n at q = 1/n
    # (n = 49: 49·(1/49) < 1), and the step would then be inf. A constant either way: post-processing.
    dp_optimizer.expected_batch_size = max(dp_optimizer.expected_batch_size, 1)
    if sample_rate:
        # One step at q, which is not 1/len(loader) = 1: account q, and average over the expected batch q·n
        # (a constant: post-processing), so that n·Δ = −(lr/q)·(noised sum) at every institution alike.
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        dp_optimizer.expected_batch_size = sample_rate * len(data)
    share = None
    if dp.distributed_min_honest:
        share = IntegerShare.attach(dp_optimizer, dp.distributed_min_honest, seeds.generator("rounding", device),
                                    seeds.noise)
    return PrivateTraining(dp_optimizer, loader, engine, hooks, sample_rate or 1.0 / len(loader),
                           dp.physical_batch_size,
                           user_gradient=dp.user_gradient if by_user else "", integer_share=share)


@dataclass
class IntegerShare:
    """Distributed DP (dp.distributed_min_honest = t): the optimizer's step as an integer share of the sum
    (privacy/skellam.py). Opacus' clipping and Gaussian noise are replaced by: clip each record's gradient
    to C as Opacus does, scale by γ = SCALE/C, round it to an integer vector of norm at most Δ₂ with this
    institution's secret rounding stream, sum, and add Skellam noise of the share's variance from its secret
    noise stream. `values` is that integer vector (K, one array per parameter); the model steps on K/γ,
    what Opacus' noised sum would be. Opacus' step hook still records σ for the accountant: the sum of t
    shares is the Skellam mechanism that `variance_for` makes no worse than the Gaussian at σ."""

    scale: float  # γ
    l2: float  # Δ₂
    variance: float  # of this share's noise (skellam.share_variance)
    rounding: torch.Generator
    noise_seed: int
    values: list[Any] | None = None

    @classmethod
    def attach(cls, optimizer, min_honest: int, rounding: torch.Generator, noise_seed: int) -> IntegerShare:
        from fedtune.privacy import skellam

        dim = sum(p.numel() for p in optimizer.params)
        share = cls(skellam.SCALE / optimizer.max_grad_norm, skellam.l2_sensitivity(dim),
                    skellam.share_variance(optimizer.noise_multiplier, dim, min_honest), rounding, noise_seed)
        optimizer.clip_and_accumulate = partial(share.clip_round_accumulate, optimizer)
        optimizer.add_noise = partial(share.add_noise, optimizer)
        return share

    def clip_round_accumulate(self, optimizer) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        params = optimizer.params
        samples = [optimizer._get_flat_grad_sample(p).flatten(start_dim=1) for p in params]  # rows x p.numel()
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=samples[0].device)
        for start in range(0, len(samples[0]), ROUNDING_ROWS):  # rows at a time: float64 copies of d values each
            total += self._rounded_sum([g[start:start + ROUNDING_ROWS] for g in samples], optimizer.max_grad_norm)
        for p, part in zip(params, total.split([p.numel() for p in params]), strict=True):
            _check_processed_flag(p.grad_sample)
            part = part.view(p.shape)
            p.summed_grad = part if p.summed_grad is None else p.summed_grad + part
            _mark_as_processed(p.grad_sample)

    def _rounded_sum(self, samples: list[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
        """Σ over these rows of round(γ·clip_C(g)): clipped as Opacus clips (C / (‖g‖ + 1e-6), at most 1)."""
        from fedtune.privacy import skellam

        flat = torch.cat([g.to(torch.float64) for g in samples], dim=1)
        clip = (max_grad_norm / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
        return skellam.round_records(flat.mul_((clip * self.scale)[:, None]), self.l2, self.rounding).sum(dim=0)

    def add_noise(self, optimizer) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        from fedtune.privacy import skellam

        if self.values is not None:
            raise RuntimeError("distributed DP takes one step a round; a second step has no share to go into")
        sizes = [p.numel() for p in optimizer.params]
        noise = torch.from_numpy(skellam.skellam_noise(sum(sizes), self.variance, self.noise_seed))
        self.values = []
        for p, part in zip(optimizer.params, noise.split(sizes), strict=True):
            _check_processed_flag(p.summed_grad)
            share = p.summed_grad.to("cpu").round().to(torch.int64).reshape(-1) + part
            self.values.append(share.reshape(p.shape).numpy())
            p.grad = (share.to(torch.float64) / self.scale).to(p.dtype).to(p.device).view_as(p)
            _mark_as_processed(p.summed_grad)


def step_on_empty_batch(optimizer: torch.optim.Optimizer) -> None:
    """Poisson sampling can draw an empty batch. The step must still happen (noise only, and
    counted by the accountant), so give every parameter an empty per-sample gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
