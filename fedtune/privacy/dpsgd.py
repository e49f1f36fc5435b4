"""Attach Opacus DP-SGD to one client's local training, continuing its privacy history.

Only wiring: Opacus' PrivacyEngine does the per-sample gradients, clipping, noise and
Poisson sampling; the accountant is restored from the client's saved history first, so
the engine's steps add to what the client has already spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from fedtune.config import DPConfig
from fedtune.privacy.accountant import History, make_accountant, normalize


@dataclass
class PrivateTraining:
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    hooks: Any  # Opacus GradSampleHooks; .cleanup() removes them from the shared model

    @property
    def history(self) -> History:
        return normalize(self.engine.accountant.history)

    @property
    def sample_rate(self) -> float:
        return 1.0 / len(self.loader)

    def close(self) -> None:
        self.hooks.cleanup()

    def upcast_grad_samples(self) -> None:
        """Call between backward() and step(). Under bf16 autocast (`--device cuda`), Opacus 1.6
        stores bf16 per-sample gradients and computes their norms and clip factors in bf16, so a
        clipped gradient measured up to 0.7% above C here: more than the noise is calibrated for.
        In the parameters' fp32, clipping holds as without autocast. A no-op when dtypes match.
        Each is one tensor: under Poisson sampling Opacus refuses a second backward pass before a step."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                sample = getattr(p, "grad_sample", None)
                if isinstance(sample, torch.Tensor) and sample.dtype != p.dtype:
                    p.grad_sample = sample.to(p.dtype)


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 dp: DPConfig, history: History, noise_seed: int) -> PrivateTraining:
    """DP-SGD around `model` (not wrapped: the cached model stays usable) with Poisson batches.
    Leaves the model in training mode, which Opacus requires."""
    model.train()
    engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant = make_accountant(dp.accountant, history)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True, wrap_model=False,
        noise_generator=torch.Generator(device=next(model.parameters()).device).manual_seed(noise_seed),
    )
    return PrivateTraining(dp_optimizer, dp_loader, engine, hooks)


def step_on_empty_batch(optimizer: torch.optim.Optimizer) -> None:
    """Poisson sampling can draw an empty batch. The step must still happen (noise only, and
    counted by the accountant), so give every parameter an empty per-sample gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
