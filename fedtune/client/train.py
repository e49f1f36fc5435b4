"""One client's local training for one round: AdamW (or SGD) on the adapter, DP-SGD when enabled,
and the FedProx proximal step when the server asks for it. The loop is the same either way: it
trains through PlainTraining here or privacy/dpsgd.py's PrivateTraining, which share one interface."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from fedtune.client.canaries import RECORD_INDEX, GradientCanaries, Indexed, indexed_collate
from fedtune.config import FedtuneConfig
from fedtune.data.buckets import LengthBucketSampler
from fedtune.data.text import TokenizedTexts, pad_batch
from fedtune.data.users import UserRecords
from fedtune.privacy.accountant import History
from fedtune.privacy.dpsgd import RoundSeeds, make_private


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's non-empty batches
    steps: int
    sample_rate: float
    history: History  # the client's whole privacy history after this round
    share: dict[str, Any] | None = None  # distributed DP: the integer share per parameter (privacy/dpsgd.py)


class Training(Protocol):
    """How train_round trains: for each of batches() (one epoch), forward and backward, then step().
    steps counts the optimizer's real steps; history is the client's privacy history with them."""

    steps: int
    sample_rate: float
    per_sample: bool  # whether a batch's backward() leaves per-sample gradients (p.grad_sample) to step on

    @property
    def history(self) -> History: ...
    def batches(self) -> Iterator[Any]: ...
    def step(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class PlainTraining:
    """Training without DP: each batch one optimizer step."""

    optimizer: torch.optim.Optimizer
    loader: DataLoader
    prior: History  # the client's privacy history before this round
    steps: int = 0
    per_sample: bool = False

    @property
    def sample_rate(self) -> float:
        return 1.0 / len(self.loader)

    @property
    def history(self) -> History:
        """No noise: sigma = 0 in the history makes the client's ε infinite from now on."""
        return [*self.prior, (0.0, self.sample_rate, self.steps)]

    def batches(self) -> Iterator[Any]:
        return iter(self.loader)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def close(self) -> None:
        pass


def proximal_step(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], lr: float, mu: float) -> None:
    """FedProx: one gradient step on (mu/2)·||w - w_global||², applied after the optimizer's step.

    Kept out of the loss so that it works unchanged under DP-SGD: Opacus rebuilds .grad from
    per-sample gradients and would drop a data-independent term; adding it afterwards is
    post-processing, so it costs no privacy.
    """
    with torch.no_grad():
        for p, w0 in zip(params, anchor, strict=True):
            p.sub_(lr * mu * (p - w0))


def _mixed_precision(device: torch.device):
    """bf16 autocast for the forward pass on a GPU that supports it (weights, gradients and the
    optimizer stay fp32; Opacus 1.6 computes per-sample gradients under autocast, in bf16, and
    PrivateTraining.upcast_grad_samples casts them to fp32 before clipping). A no-op on CPU."""
    # including_emulation=False: a GPU without bf16 units (V100, T4) stays in fp32 rather than emulate it
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _optimizer(params: list[torch.nn.Parameter], cfg: FedtuneConfig, proximal_mu: float) -> torch.optim.Optimizer:
    """The round's optimizer; with FedProx, every step it really takes (under DP-SGD: once per
    logical batch, empty ones included) is followed by the proximal step."""
    lr = cfg.train.learning_rate
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if proximal_mu > 0:
        anchor = [p.detach().clone() for p in params]
        optimizer.register_step_post_hook(lambda *_: proximal_step(params, anchor, lr, proximal_mu))
    return optimizer


def _loader(data: TokenizedTexts | UserRecords, cfg: FedtuneConfig, seeds: RoundSeeds, indexed: bool) -> DataLoader:
    """Batches without DP: shuffled, or grouped by length (config allows that only without DP). Records
    grouped by user are trained as records: without DP there is no user to protect. `indexed`: each
    batch also names its rows (RECORD_INDEX), for gradient canaries."""
    data = data.records if isinstance(data, UserRecords) else data
    batch_size = min(cfg.train.batch_size, len(data))
    lengths = [len(ids) for ids in data.input_ids] if cfg.train.length_buckets else []
    data, collate = _named_rows(data, indexed)
    if cfg.train.length_buckets:
        sampler = LengthBucketSampler(lengths, batch_size, seeds.sampling)
        return DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    return DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate,
                      generator=seeds.generator("sampling"))


def _training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TokenizedTexts, cfg: FedtuneConfig,
              history: History, seeds: RoundSeeds, indexed: bool) -> Training:
    if cfg.dp.enabled:
        rows, collate = _named_rows(data, indexed)
        return make_private(model, optimizer, rows, cfg.train.batch_size, collate, cfg.dp, history, seeds,
                            cfg.train.sample_rate)
    return PlainTraining(optimizer, _loader(data, cfg, seeds, indexed), history)


def _named_rows(data, indexed: bool):
    """(the data, its collate); `indexed`: each batch also names its rows (RECORD_INDEX)."""
    return (Indexed(data), indexed_collate(pad_batch)) if indexed else (data, pad_batch)


def train_round(model: torch.nn.Module, data: TokenizedTexts, cfg: FedtuneConfig, history: History,
                proximal_mu: float, seed: int | None, canaries: GradientCanaries | None = None) -> TrainResult:
    """One round of local training. `seed` None: secret randomness (DP-SGD's default); a number:
    reproducible, with sampling, noise and dropout each derived from it separately. `canaries`: the
    audit's gradient canaries among `data` (client/canaries.py)."""
    seeds = RoundSeeds.of_round(cfg.dp, seed)
    torch.manual_seed(seeds.model)  # dropout; sampling and noise have generators of their own
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg, proximal_mu)
    model.train()
    losses = []
    with closing(_training(model, optimizer, data, cfg, history, seeds, canaries is not None)) as training:
        for _ in range(cfg.train.local_epochs):
            for batch in training.batches():
                rows = batch.pop(RECORD_INDEX, None)
                with _mixed_precision(device):
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                if canaries is not None:
                    canaries.inject(params, rows, per_sample=training.per_sample)
                training.step()
                losses.append(loss.item())
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    integer = getattr(training, "integer_share", None)
    share = None
    if integer is not None and integer.values is not None:
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        share = dict(zip(names, integer.values, strict=True))
    return TrainResult(mean_loss, training.steps, training.sample_rate, training.history, share)


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable LoRA matrices, to tell afterwards whether training moved them."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}


def moved(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    """Whether any LoRA matrix differs from `before` (False when there is none to move)."""
    now = dict(model.named_parameters())
    return any(not torch.equal(now[name].detach(), value) for name, value in before.items())
