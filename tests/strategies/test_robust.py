"""Robust aggregation: the coordinate-wise median and trimmed mean against hand-computed values,
and the wrapper composed with FedAvg, FedProx and a server optimizer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.strategies.build import build_strategy
from fedtune.strategies.robust import RobustAggregation
from fedtune.strategies.server_opt import FedAdam

pytestmark = pytest.mark.usefixtures("flower_run")
GRID = SimpleNamespace(get_node_ids=lambda: [1, 2, 3, 4, 5])


def reply(a: list[float], head: list[float], num_examples: int, loss: float = 1.0, eps: float = 1.0) -> Message:
    content = RecordDict({
        k.ARRAYS: ArrayRecord({"lora_A": Array(np.array(a, dtype=np.float32)),
                               "head": Array(np.array(head, dtype=np.float32))}),
        k.METRICS: MetricRecord({k.NUM_EXAMPLES: num_examples, k.TRAIN_LOSS: loss, k.EPSILON: eps}),
    })
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def robust(method: str, name: str = "fedavg", clients: int = 5, **extra) -> RobustAggregation:
    cfg = FedtuneConfig().with_overrides({"clients": clients, "strategy.name": name, "strategy.robust": method,
                                          **extra})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, RobustAggregation)
    return strategy


def aggregate(strategy, replies, global_a=(0.0, 0.0), global_head=(0.0,)):
    sent = ArrayRecord({"lora_A": Array(np.array(global_a, dtype=np.float32)),
                        "head": Array(np.array(global_head, dtype=np.float32))})
    strategy.configure_train(1, sent, ConfigRecord(), GRID)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return {n: a.numpy() for n, a in arrays.items()}, metrics


def test_median_ignores_an_outlier_and_the_claimed_example_counts():
    replies = [reply([1.0, 10.0], [0.0], 1), reply([2.0, -5.0], [4.0], 1), reply([100.0, 0.0], [1.0], 1000)]
    got, _ = aggregate(robust("median", clients=3), replies)
    # per coordinate: median(1, 2, 100) = 2, median(10, -5, 0) = 0, median(0, 4, 1) = 1; the
    # client claiming 1000 examples counts once (the example-weighted mean would be ~99.8)
    np.testing.assert_array_equal(got["lora_A"], [2.0, 0.0])
    np.testing.assert_array_equal(got["head"], [1.0])
    assert got["lora_A"].dtype == np.float32


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    replies = [reply([1.0, 0.0], [0.0], 1), reply([2.0, 0.0], [0.0], 1), reply([4.0, 0.0], [0.0], 1),
               reply([50.0, 0.0], [0.0], 1)]
    got, _ = aggregate(robust("median", clients=4), replies)
    np.testing.assert_array_equal(got["lora_A"], [3.0, 0.0])  # (2 + 4) / 2


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    a_values = [1.0, 2.0, 3.0, 4.0, 100.0]
    head_values = [-50.0, 0.0, 1.0, 2.0, 3.0]
    replies = [reply([a, -a], [h], 10) for a, h in zip(a_values, head_values, strict=True)]
    got, _ = aggregate(robust("trimmed-mean", clients=5, **{"strategy.trim_fraction": 0.2}), replies)
    # trim 0.2 of 5: one value dropped at each end of every coordinate, the middle three averaged
    np.testing.assert_allclose(got["lora_A"], [3.0, -3.0])  # (2 + 3 + 4) / 3
    np.testing.assert_allclose(got["head"], [1.0])  # (0 + 1 + 2) / 3


def test_metrics_come_from_the_real_replies_and_the_replies_are_left_intact():
    replies = [reply([1.0, 0.0], [0.0], 10, loss=1.0, eps=2.0), reply([2.0, 0.0], [0.0], 30, loss=3.0, eps=1.0),
               reply([3.0, 0.0], [0.0], 60, loss=2.0, eps=1.5)]
    _, metrics = aggregate(robust("median", clients=3), replies)
    assert metrics[k.TRAIN_LOSS] == pytest.approx((10 * 1.0 + 30 * 3.0 + 60 * 2.0) / 100)  # weighted by examples
    assert metrics[k.EPSILON] == 2.0  # the worst client
    assert metrics[k.NUM_EXAMPLES] == 100
    assert [r.content[k.ARRAYS]["lora_A"].numpy()[0] for r in replies] == [1.0, 2.0, 3.0]  # nothing popped


def test_robust_around_fedprox_forwards_the_proximal_term():
    strategy = robust("median", name="fedprox", clients=3, **{"strategy.proximal_mu": 0.25})
    config = ConfigRecord({})
    messages = list(strategy.configure_train(1, ArrayRecord(), config, GRID))
    assert messages and config[k.PROXIMAL_MU] == 0.25
    got, _ = aggregate(strategy, [reply([1.0, 0.0], [0.0], 1), reply([5.0, 0.0], [0.0], 1),
                                  reply([2.0, 0.0], [0.0], 1)])
    np.testing.assert_array_equal(got["lora_A"], [2.0, 0.0])


def test_a_server_optimizer_steps_on_the_robust_aggregate():
    inner = FedAdam(eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, min_train_nodes=1, min_evaluate_nodes=1,
                    min_available_nodes=1)
    strategy = RobustAggregation(inner, "median")
    replies = [reply([1.5, 1.0], [2.0], 1), reply([1.5, 40.0], [2.0], 1), reply([-30.0, 1.0], [2.0], 1)]
    got, _ = aggregate(strategy, replies, global_a=(1.0, 2.0), global_head=(2.0,))
    # median [1.5, 1.0] from [1.0, 2.0]: Δ = [0.5, -1.0]; FedAdam's first step (test_server_opt.py):
    # x + η1 m / (√v + τ) with m = [0.25, -0.5], √v = [0.25, 0.5], η1 = 0.1 √0.4375 / 0.75
    eta1 = 0.1 * math.sqrt(0.4375) / 0.75
    np.testing.assert_allclose(got["lora_A"], [1.0 + eta1 * 0.25 / 0.75, 2.0 - eta1 * 0.5], rtol=1e-6)
    np.testing.assert_array_equal(got["head"], [2.0])  # Δ = 0 there: no step
    assert inner.m_t is not None  # the optimizer's state moved


def test_no_replies_aggregate_to_nothing():
    strategy = robust("median", clients=3)
    assert strategy.aggregate_train(1, []) == (None, None)


@pytest.mark.parametrize("overrides, option", [
    ({"strategy.robust": "median", "dp.client_dp": "fixed", "dp.delta": 1e-3}, "strategy.robust"),
    ({"strategy.name": "fedadam", "dp.client_dp": "fixed", "dp.delta": 1e-3}, "strategy.name"),
    ({"strategy.robust": "median", "dp.secagg": True}, "strategy.robust"),
    ({"strategy.max_update_norm": 5.0, "dp.secagg": True}, "strategy.max_update_norm"),
    ({"strategy.robust": "trimmed-mean", "strategy.trim_fraction": 0.05}, "strategy.trim_fraction"),
    ({"strategy.trim_fraction": 0.5}, "strategy.trim_fraction"),
    ({"strategy.server_momentum": 1.0}, "strategy.server_momentum"),
    ({"strategy.tau": 0.0}, "strategy.tau"),
    ({"strategy.max_update_norm": 0.0}, "strategy.max_update_norm"),
    ({"strategy.fraction_train": 0.0}, "strategy.fraction_train"),  # the older checks still run
])
def test_combinations_that_do_not_compose_are_refused_by_name(overrides, option):
    with pytest.raises(ConfigError, match=f"`{option}`"):
        FedtuneConfig().with_overrides(overrides)
