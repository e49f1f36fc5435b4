"""One client's local training for one round: AdamW (or SGD) on the adapter, DP-SGD when enabled,
and the FedProx proximal step when the server asks for it."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from fedtune.config import FedtuneConfig
from fedtune.data.buckets import LengthBucketSampler
from fedtune.data.text import TokenizedTexts, pad_batch
from fedtune.privacy.accountant import History
from fedtune.privacy.dpsgd import RoundSeeds, make_private, step_on_empty_batch


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's non-empty batches
    steps: int
    sample_rate: float
    history: History  # the client's whole privacy history after this round


def proximal_step(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], lr: float, mu: float) -> None:
    """FedProx: one gradient step on (mu/2)·||w - w_global||², applied after the optimizer's step.

    Kept out of the loss so that it works unchanged under DP-SGD: Opacus rebuilds .grad from
    per-sample gradients and would drop a data-independent term; adding it afterwards is
    post-processing, so it costs no privacy.
    """
    with torch.no_grad():
        for p, w0 in zip(params, anchor, strict=True):
            p.sub_(lr * mu * (p - w0))


def _is_empty(batch) -> bool:
    """Poisson sampling may draw no example (privacy/dpsgd.py's loader then yields None)."""
    return batch is None


def _mixed_precision(device: torch.device):
    """bf16 autocast for the forward pass on a GPU that supports it (weights, gradients and the
    optimizer stay fp32; Opacus 1.6 computes per-sample gradients under autocast, in bf16, and
    PrivateTraining.upcast_grad_samples casts them to fp32 before clipping). A no-op on CPU."""
    # including_emulation=False: a GPU without bf16 units (V100, T4) stays in fp32 rather than emulate it
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _stepped(optimizer: torch.optim.Optimizer) -> bool:
    """False after a physical batch that BatchMemoryManager split off a larger logical batch:
    Opacus then only accumulated clipped gradients and the real step comes later. Opacus
    exposes this only as DPOptimizer._is_last_step_skipped."""
    return not getattr(optimizer, "_is_last_step_skipped", False)


def _optimizer(params: list[torch.nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _loader(data: TokenizedTexts, cfg: FedtuneConfig, seeds: RoundSeeds) -> DataLoader:
    """Batches without DP: shuffled, or grouped by length (config allows that only without DP)."""
    batch_size = min(cfg.train.batch_size, len(data))
    if cfg.train.length_buckets:
        sampler = LengthBucketSampler([len(ids) for ids in data.input_ids], batch_size, seeds.sampling)
        return DataLoader(data, batch_sampler=sampler, collate_fn=pad_batch)
    return DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=pad_batch,
                      generator=seeds.generator("sampling"))


def train_round(model: torch.nn.Module, data: TokenizedTexts, cfg: FedtuneConfig, history: History,
                proximal_mu: float, seed: int | None) -> TrainResult:
    """One round of local training. `seed` None: secret randomness (DP-SGD's default); a number:
    reproducible, with sampling, noise and dropout each derived from it separately."""
    seeds = RoundSeeds.secret() if seed is None else RoundSeeds.derived(seed)
    torch.manual_seed(seeds.model)  # dropout; sampling and noise have generators of their own
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = _optimizer(params, cfg.train.optimizer, cfg.train.learning_rate)
    model.train()
    private = None
    if cfg.dp.enabled:
        private = make_private(model, optimizer, data, cfg.train.batch_size, pad_batch, cfg.dp, history, seeds)
        optimizer, loader = private.optimizer, private.loader
    else:
        loader = _loader(data, cfg, seeds)
    losses, steps = [], 0
    try:
        with ExitStack() as stack:
            if private is not None and cfg.dp.physical_batch_size:
                loader = stack.enter_context(BatchMemoryManager(
                    data_loader=loader, max_physical_batch_size=cfg.dp.physical_batch_size, optimizer=optimizer))
            for _ in range(cfg.train.local_epochs):
                for batch in loader:
                    if _is_empty(batch):
                        step_on_empty_batch(optimizer)
                    else:
                        with _mixed_precision(device):
                            out = model(**{k: v.to(device) for k, v in batch.items()})
                        out.loss.backward()
                        if private is not None:
                            private.upcast_grad_samples()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        losses.append(out.loss.item())
                    if _stepped(optimizer):
                        if anchor:
                            proximal_step(params, anchor, cfg.train.learning_rate, proximal_mu)
                        steps += 1
    finally:
        if private is not None:
            private.close()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    if private is None:  # no noise: sigma = 0 in the history makes the client's ε infinite from now on
        q = 1.0 / len(loader)
        return TrainResult(mean_loss, steps, q, [*history, (0.0, q, steps)])
    return TrainResult(mean_loss, steps, private.sample_rate, private.history)


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable LoRA matrices, to tell afterwards whether training moved them."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}


def moved(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    """Whether any LoRA matrix differs from `before` (False when there is none to move)."""
    now = dict(model.named_parameters())
    return any(not torch.equal(now[name].detach(), value) for name, value in before.items())
