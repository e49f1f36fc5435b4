"""Server optimizers over adapter updates: Flower's FedAdam, FedYogi and FedAvgM, made resumable.

Each takes the example-weighted mean of the replies, Δ = mean - x (x: the global adapter sent this
round), as a pseudo-gradient and steps from x (Reddi et al. 2021, "Adaptive Federated
Optimization"; Hsu et al. 2019 for server momentum). The math is Flower's:
    FedAdam  m <- β1 m + (1-β1) Δ;  v <- β2 v + (1-β2) Δ²;            x <- x + η_t m / (√v + τ)
             η_t = η √(1 - β2^(t+1)) / (1 - β1^(t+1)), t = server round (so the first step is ~0.74 η)
    FedYogi  m as FedAdam;          v <- v - (1-β2) Δ² sign(v - Δ²);  x <- x + η m / (√v + τ)
    FedAvgM  g = -Δ;  b <- μ b + g (b = g the first round);          x <- x - η b

What fedtune adds around it:
1. The global adapter keeps its dtype. Flower's FedAdam returns float64 (its bias-corrected η is a
   numpy float64), which would double every later message and fail the check that a client's
   tensors have the global ones' dtype (server/validate.py).
2. The optimizer's state (m and v, or the momentum b) is saved in every round's checkpoint and
   restored on `--resume` (`state_dict` / `load_state_dict`), so a resumed run
   continues the same optimizer instead of restarting its moments from zero.
3. FedAvgM steps from the arrays sent in the round it aggregates. Flower's takes them from the first
   configure_train only and afterwards assumes that its own last output is what went out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi

from fedtune.errors import FedtuneError


class _Resumable:
    """Mixed in before Flower's class: dtype-preserving output and a flat state dict.

    A subclass names its state: attributes holding {array name: ndarray} (or None before the
    first step)."""

    STATE: tuple[str, ...] = ()
    STATE_KEY = "server_optimizer"  # its part of the strategy's state (strategies/wrapper.py)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._dtypes = {name: array.numpy().dtype for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            arrays = ArrayRecord({name: Array(np.asarray(a.numpy(), dtype=self._dtypes[name]))
                                  for name, a in arrays.items()})
        return arrays, metrics

    def _get(self, attribute: str) -> dict[str, np.ndarray] | None:
        return getattr(self, attribute)

    def _set(self, attribute: str, values: dict[str, np.ndarray]) -> None:
        setattr(self, attribute, values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as `<attribute>/<array name>` -> tensor (empty before the first step)."""
        state = {}
        for attribute in self.STATE:
            for name, value in (self._get(attribute) or {}).items():
                state[f"{attribute}/{name}"] = torch.from_numpy(np.array(value))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted({key.split("/", 1)[0] for key in state} - set(self.STATE))
        if unknown:
            raise FedtuneError(f"The checkpoint's server optimizer state ({', '.join(unknown)}) is not "
                               f"{type(self).__name__}'s; resume the run with its own config.")
        for attribute in self.STATE:
            prefix = f"{attribute}/"
            values = {key[len(prefix):]: t.numpy() for key, t in state.items() if key.startswith(prefix)}
            if values:
                self._set(attribute, values)


class FedAdam(_Resumable, FlowerFedAdam):
    STATE = ("m_t", "v_t")


class FedYogi(_Resumable, FlowerFedYogi):
    STATE = ("m_t", "v_t")


class FedAvgM(_Resumable, FlowerFedAvgM):
    STATE = ("momentum_vector",)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays  # see the module docstring, 3.
        return super().configure_train(server_round, arrays, config, grid)

    # Flower keeps the momentum as a list in the arrays' order; the checkpoint names each tensor.
    def _get(self, attribute: str) -> dict[str, np.ndarray] | None:
        if self.momentum_vector is None:
            return None
        return dict(zip(self.current_arrays.keys(), self.momentum_vector, strict=True))

    def _set(self, attribute: str, values: dict[str, np.ndarray]) -> None:
        self.momentum_vector = list(values.values())


def build_server_optimizer(name: str, common: dict[str, Any], learning_rate: float, momentum: float,
                           beta_1: float, beta_2: float, tau: float) -> FedAdam | FedYogi | FedAvgM:
    """One of the three by name; `common` holds FedAvg's sampling and metric arguments."""
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=learning_rate, server_momentum=momentum, **common)
    adaptive = FedAdam if name == "fedadam" else FedYogi
    # eta_l is Flower's record of the clients' learning rate; FedOpt never uses it.
    return adaptive(eta=learning_rate, beta_1=beta_1, beta_2=beta_2, tau=tau, **common)
