"""Client-level DP's sampling of institutions: each one joins a round by its own coin flip.

The client-level accounting (privacy/client_level.py) is the Poisson-subsampled Gaussian: each
institution in a round independently with probability q. Flower's strategies sample exactly m
of the connected nodes instead, for which that analysis is no proof (a realisable worst case
for fixed-size sampling puts the true ε at z = 1, q = 0.1, 100 rounds, δ = 1e-3 at 12.06
or more, against 5.64 reported), and with fewer nodes connected than planned the rate is m over
those, up to 1. `PoissonCohort` makes the sampling the one accounted: the inner strategy asks
every connected node, and each is kept with probability q = m / N, so the cohort size varies.
ZeroFilledMean then divides by the expected cohort m, a constant, as McMahan et al. (2018) do,
so one institution moves the aggregate by at most C/m whatever the cohort size.

The coin flips use the OS's secure randomness; the server is trusted with them (client-level DP
is central DP).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.strategies.wrapper import StrategyWrapper


class PoissonCohort(StrategyWrapper):
    """Keep each of the inner strategy's train messages (one per connected node) with probability q."""

    def __init__(self, strategy: Strategy, sample_rate: float) -> None:
        super().__init__(strategy)
        self.sample_rate = sample_rate
        self._coins = random.SystemRandom()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return [m for m in messages if self._coins.random() < self.sample_rate]
