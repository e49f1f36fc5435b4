"""The base of fedtune's strategy wrappers: hold an inner strategy and forward to it.

Flower's DP wrappers each repeat the forwarding; here a wrapper overrides only the hooks it
changes (usually aggregate_train) and inherits the rest.

A stack of strategies (ours and Flower's wrappers each hold the inner one in `.strategy`) keeps
its resumable state in the layers that own it: a server optimizer's moments, client-level DP's
count of releases and clipping norm. Such a layer names its part with STATE_KEY and offers
`state_dict()` / `load_state_dict()`; `state_dict(strategy)` and `load_state_dict(strategy, state)`
below walk the whole stack, so the round loop asks once, whatever the stack's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.errors import FedtuneError


class StrategyWrapper(Strategy):
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()



def layers(strategy: Strategy) -> Iterator[Strategy]:
    """`strategy` and every strategy it wraps, outermost first."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "strategy", None)


def state_dict(strategy: Strategy) -> dict[str, Any]:
    """The resumable state of every layer that has one, by its STATE_KEY (empty: nothing to keep)."""
    return {layer.STATE_KEY: layer.state_dict() for layer in layers(strategy) if hasattr(layer, "STATE_KEY")}


def load_state_dict(strategy: Strategy, state: dict[str, Any]) -> None:
    """On resume: give each layer its part of `state`. A part that no layer owns means the run's
    strategy is not the one that saved it, and is refused."""
    owners = {layer.STATE_KEY: layer for layer in layers(strategy) if hasattr(layer, "STATE_KEY")}
    orphans = sorted(key for key, part in state.items() if part and key not in owners)
    if orphans:
        raise FedtuneError(f"The run's saved strategy state ({', '.join(orphans)}) belongs to a strategy this run "
                           "does not use; resume the run with its own config.")
    for key, layer in owners.items():
        if state.get(key):
            layer.load_state_dict(state[key])
