"""Client-level DP: Flower's DP strategy wrappers around fedtune's aggregation.

The stack, outermost first:
    Flower's DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping  clip (server side), noise
    ZeroFilledMean                                                         sum over the cohort / m
    PoissonCohort (strategies/cohort.py)                                   each node by a coin flip, q = m/N
    FedAvg / FedProx                                                       messages to every node, metrics

Flower's wrappers add noise of std z*C/m to whatever the inner strategy returns, which is right
only if that is the unweighted mean of m clipped updates. FedAvg weights by examples (one large
institution could move the mean by up to C, not C/m) and divides by the updates it received
(declined and failed institutions would shrink m and leak who trained). ZeroFilledMean is the
fixed-denominator mean of McMahan et al. (2018): every sampled institution counts once, one that
sent no update counts as a zero update, so the sensitivity is exactly C/m every round.

The subclasses below add two things to Flower's wrappers: the facts the ledger needs (releases,
the accounted z; privacy/client_level.py does the arithmetic), and, for adaptive clipping, two
corrections to flwr 1.42 (see _AdaptiveCorrections). Flower's own accountant is not used: it
needs no-amplification sampling, equal FedAvg weights and exactly m replies (a declined client
aborts the aggregation), exists for fixed clipping only, and its state is not in our checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedtune.config import FedtuneConfig
from fedtune.errors import FedtuneError
from fedtune.privacy.client_level import (
    ClientLevelAccount,
    adaptive_noise_inputs,
    combined_noise_multiplier,
)
from fedtune.strategies.canary_clients import CanaryClients, flat_order
from fedtune.strategies.cohort import PoissonCohort
from fedtune.strategies.wrapper import StrategyWrapper


class ZeroFilledMean(StrategyWrapper):
    """Aggregate train replies as global + (sum of updates) / m, m fixed (the expected number of
    institutions per round, whatever the cohort's size); forward everything else.

    Metrics still come from the inner strategy (example-weighted loss, worst ε). With `canaries`
    (an audit, strategies/canary_clients.py), the round's sampled canary institutions' updates
    C·c_j are added to the sum, C read from `canary_norm` (the DP wrapper's current norm). With
    `clipped_to` (server-side clipping), each reply's update is held to that norm (see below)."""

    def __init__(self, strategy: Strategy, num_sampled_clients: int, canaries: CanaryClients | None = None) -> None:
        super().__init__(strategy)
        self.num_sampled_clients = num_sampled_clients
        self.current_arrays = ArrayRecord()
        self.canaries = canaries
        self.canary_norm: Callable[[], float] = lambda: 0.0  # set by with_client_dp to the wrapper's norm
        self.clipped_to: Callable[[], float] | None = None  # set by with_client_dp under server-side clipping

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        m = self.num_sampled_clients  # the expected cohort: Poisson sampling may send more or fewer
        metrics = self.strategy.aggregate_train(server_round, replies)[1] if replies else None
        names = list(self.current_arrays.keys())
        base = [a.astype(np.float64) for a in self.current_arrays.to_numpy_ndarrays()]
        total = [np.zeros_like(b) for b in base]
        # Flower's server-side wrappers clip each update in float32 and hand on the clipped weights b + u,
        # rounded to float32: the update recovered here can exceed C by that rounding (a review measured
        # 1.000009·C, d = 74,000), and the noise is calibrated to C. Scale such an update back to C, in
        # float64; never up. Not under client-side clipping: the mod clips inside C, and with SecAgg+ a
        # reply is a sum of updates.
        bound = self.clipped_to() if self.clipped_to is not None else math.inf
        for reply in replies:
            (record,) = reply.content.array_records.values()
            if list(record.keys()) != names:  # Flower's clipping pairs arrays by position
                raise FedtuneError(f"Round {server_round}: an update's arrays do not match the global ones.")
            update = [value - b for value, b in zip(record.to_numpy_ndarrays(), base, strict=True)]
            norm = math.sqrt(sum(float(np.sum(u * u)) for u in update)) if bound < math.inf else 0.0
            scale = bound / norm if norm > bound else 1.0
            for acc, u in zip(total, update, strict=True):
                acc += u * scale
        if self.canaries is not None:
            order = flat_order(names)
            added = self.canaries.round_sum(server_round, [base[i].shape for i in order], self.canary_norm())
            for i, update in zip(order, added, strict=True):
                total[i] += update
        # In float64: rounding the mean to the model's float32 before the noise could move it by up to
        # half a float32 step per value (√d of them), beyond the C/m the noise is calibrated to.
        # _ClientLevel rounds after the noise, which is post-processing.
        mean = {n: Array(b + acc / m) for n, b, acc in zip(names, base, total, strict=True)}
        return ArrayRecord(mean), metrics

    def dtypes(self) -> dict[str, np.dtype]:
        return {name: array.dtype for name, array in zip(self.current_arrays.keys(),
                                                         self.current_arrays.to_numpy_ndarrays(), strict=True)}


class _ClientLevel:
    """Counts noised releases and describes them for the ledger. Mixed into Flower's wrappers.
    Its state (strategies/wrapper.py) is the ledger's `client_level` entry."""

    STATE_KEY = "client_level"

    clipping: str
    side: str
    clipping_norm: float
    noise_multiplier: float

    def __init__(self, *args: Any, sample_rate: float, delta: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_rate = sample_rate
        self.delta = delta
        self.releases = 0

    def accounted_noise_multiplier(self) -> float:
        return self.noise_multiplier

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.releases += 1
            dtypes = self.strategy.dtypes()  # type: ignore[attr-defined]  # ZeroFilledMean's: the model's
            arrays = ArrayRecord({name: Array(arrays[name].numpy().astype(dtypes[name])) for name in arrays.keys()})
        return arrays, metrics

    def account(self) -> ClientLevelAccount:
        return ClientLevelAccount(self.clipping, self.side, self.accounted_noise_multiplier(),  # type: ignore[arg-type]
                                  float(self.clipping_norm), self.sample_rate, self.releases, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return self.account().to_dict()

    def load_state_dict(self, entry: dict[str, Any]) -> None:
        """Continue from a ledger's `client_level` entry; refuse one written under other settings."""
        mine = self.account().to_dict()
        changed = [key for key in ("clipping", "side", "noise_multiplier", "sample_rate", "delta")
                   if key in entry and entry[key] != mine[key] and not _close(entry[key], mine[key])]
        if changed:
            raise FedtuneError("The run's client-level DP ledger was written with other settings "
                               f"({', '.join(changed)}); resume it with its own config.")
        self.releases = int(entry["rounds"])
        self.clipping_norm = float(entry["clipping_norm"])


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


class _AdaptiveCorrections:
    """Two corrections to flwr 1.42's adaptive wrappers, through their private hooks (flwr is
    pinned to 1.42; tests/strategies/test_client_dp.py fails if these hooks stop being used):

    1. Flower updates the clipping norm before it adds the noise, so the noise is scaled to the
       next round's norm, not to the norm the updates were clipped to. When the norm shrinks,
       the round gets less noise than z promises. We apply the update after the noise.
    2. Flower divides the noisy clipped-count by the number of replies; with ZeroFilledMean a
       missing update is a zero (unclipped) update, so the denominator is m."""

    clipping_norm: float
    num_sampled_clients: int
    clipped_count_stddev: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_fraction: float | None = None

    def accounted_noise_multiplier(self) -> float:
        return combined_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)  # type: ignore[attr-defined]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._pending_fraction = None
        result = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if self._pending_fraction is not None:
            super()._geometric_update(self._pending_fraction)  # type: ignore[misc]
            self._pending_fraction = None
        return result

    def _geometric_update(self, clipped_fraction: float) -> None:
        self._pending_fraction = clipped_fraction

    def _noisy_fraction(self, count: int, total: int) -> float:
        return super()._noisy_fraction(count, self.num_sampled_clients)  # type: ignore[misc]


class ServerSideFixed(_ClientLevel, DifferentialPrivacyServerSideFixedClipping):
    clipping, side = "fixed", "server"


class ClientSideFixed(_ClientLevel, DifferentialPrivacyClientSideFixedClipping):
    clipping, side = "fixed", "client"


class ServerSideAdaptive(_AdaptiveCorrections, _ClientLevel, DifferentialPrivacyServerSideAdaptiveClipping):
    clipping, side = "adaptive", "server"


class ClientSideAdaptive(_AdaptiveCorrections, _ClientLevel, DifferentialPrivacyClientSideAdaptiveClipping):
    clipping, side = "adaptive", "client"


WRAPPERS = {("fixed", "server"): ServerSideFixed, ("fixed", "client"): ClientSideFixed,
            ("adaptive", "server"): ServerSideAdaptive, ("adaptive", "client"): ClientSideAdaptive}


class _DropReplyCountWarning(logging.Filter):
    # Flower warns whenever fewer than m clients send an update (declined, failed). Under
    # ZeroFilledMean that is expected and harmless: a missing update counts as a zero one, so
    # the noise stays calibrated to m. The warning would only alarm the user for nothing.
    def filter(self, record: logging.LogRecord) -> bool:
        return "differs from the number of sampled clients" not in record.getMessage()


_REPLY_COUNT_FILTER = _DropReplyCountWarning()


def with_client_dp(strategy: FedAvg, cfg: FedtuneConfig) -> Strategy:
    """`strategy` under client-level DP as cfg.dp asks (client_dp must not be `off`). `strategy`
    asks every connected node to train (strategies/build.py); each is kept with probability m/N."""
    logging.getLogger("flwr").addFilter(_REPLY_COUNT_FILTER)  # once: addFilter keeps no duplicates
    dp = cfg.dp
    m = cfg.clients_sampled()
    canaries = canary_clients(cfg)
    inner = ZeroFilledMean(PoissonCohort(strategy, m / cfg.clients) if m < cfg.clients else strategy, m, canaries)
    wrapper = WRAPPERS[(dp.client_dp, dp.client_dp_side)]
    accounting = dict(sample_rate=m / cfg.clients, delta=dp.delta)
    if dp.client_dp == "fixed":
        outer = wrapper(inner, dp.client_noise_multiplier, dp.client_clipping_norm, m, **accounting)
    else:
        z_in, count_noise = adaptive_noise_inputs(dp.client_noise_multiplier, m)
        outer = wrapper(inner, z_in, m, initial_clipping_norm=dp.client_clipping_norm,
                        clipped_count_stddev=count_noise, **accounting)
    inner.canary_norm = lambda: float(outer.clipping_norm)  # the norm this round's updates are clipped to
    if dp.client_dp_side == "server":  # (never with SecAgg+: config.py refuses it)
        inner.clipped_to = inner.canary_norm
    return outer


def canary_clients(cfg: FedtuneConfig) -> CanaryClients | None:
    """The run's canary institutions for the client-level audit; None when dp.canary_clients is 0."""
    if not cfg.dp.canary_clients:
        return None
    return CanaryClients(cfg.dp.canary_clients, cfg.seed, cfg.clients_sampled() / cfg.clients)
