"""Robust aggregation: a coordinate-wise median or trimmed mean of the updates, around any strategy
of the FedAvg family (FedAvg, FedProx, FedAdam, FedYogi, FedAvgM).

    RobustAggregation      combines the replies' arrays robustly and hands the inner strategy ONE
      inner strategy       reply carrying the result; sampling, configs and evaluation pass through

The inner strategy then does with that reply what it does with any: FedAvg and FedProx return it
unchanged (the weighted mean of one reply is itself, exactly), and FedAdam, FedYogi and FedAvgM take
their server step from it, so a server optimizer steps on the robust aggregate instead of the mean.
Metrics are aggregated over the real replies with the inner strategy's own function (loss by
examples, worst ε) and travel in that one reply, weighted by all the examples.

The wrapper holds the inner strategy and forwards what it does not change, as Flower's DP wrappers
do. Those post-process the inner strategy's output (clip, noise); this one must replace its input
instead, since the mean the inner strategy would compute is exactly what one outlier can drag.

Every institution counts once: weighting by the number of examples a client reports would let one
client claim a large count and decide the median alone. The median of an even number of values is
the mean of the middle two; the trimmed mean is Flower's `trim_mean` (its FedTrimmedAvg's): per
coordinate, floor(fraction x n) values dropped at each end, the rest averaged. Both are computed in
float64 and returned in the global adapter's dtype. Flower's FedMedian and FedTrimmedAvg cannot be
used as they are: they are strategies of their own, so no server optimizer could step on their
output, and they pop the arrays out of the replies they are given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedtune import constants as k
from fedtune.strategies.wrapper import StrategyWrapper

Method = Literal["median", "trimmed-mean"]


def combine(tensors: list[np.ndarray], method: Method, trim_fraction: float) -> np.ndarray:
    """The coordinate-wise median or trimmed mean of same-shaped tensors, in their dtype."""
    values = np.stack(tensors).astype(np.float64)
    result = np.median(values, axis=0) if method == "median" else trim_mean(values, trim_fraction)
    return np.asarray(result, dtype=tensors[0].dtype)


class RobustAggregation(StrategyWrapper):
    """Replace the mean of the updates by a robust combination; the inner strategy steps on it."""

    def __init__(self, strategy: FedAvg, method: Method, trim_fraction: float = 0.1) -> None:
        super().__init__(strategy)
        self.method = method
        self.trim_fraction = trim_fraction

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return self.strategy.aggregate_train(server_round, replies)
        records = [next(iter(r.content.array_records.values())) for r in replies]
        names = list(records[0].keys())  # server/validate.py: every reply has the global tensors, in order
        combined = ArrayRecord({name: Array(combine([r[name].numpy() for r in records], self.method,
                                                    self.trim_fraction)) for name in names})
        inner = self.strategy
        contents = [r.content for r in replies]
        metrics = inner.train_metrics_aggr_fn(contents, inner.weighted_by_key)
        # One stand-in reply (Flower's strategies read only its content), weighted by all the examples;
        # Flower's default metric function does not keep the weight key, which the inner one requires.
        weight = sum(next(iter(c.metric_records.values()))[inner.weighted_by_key] for c in contents)
        first = replies[0].metadata
        one = Message(RecordDict({k.ARRAYS: combined,
                                  k.METRICS: MetricRecord({**metrics, inner.weighted_by_key: weight})}),
                      dst_node_id=first.dst_node_id, message_type=first.message_type)
        arrays, _ = inner.aggregate_train(server_round, [one])
        return arrays, metrics
