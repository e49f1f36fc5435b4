"""FedAdam, FedYogi and FedAvgM over adapter updates: two rounds each against values worked out
by hand from the update rules (fedtune/strategies/server_opt.py), plus dtype and resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.errors import FedtuneError
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.run_dir import Checkpoint, RunDirectory
from fedtune.strategies.build import build_strategy
from fedtune.strategies.server_opt import FedAdam, FedAvgM, FedYogi
from fedtune.strategies.wrapper import load_state_dict, state_dict

pytestmark = pytest.mark.usefixtures("flower_run")

X0 = [1.0, 2.0]  # the global adapter before round 1
# Round 1: two clients, 1 and 3 examples; their weighted mean is [1.5, 1.0], so Δ1 = [0.5, -1.0].
ROUND_1 = [([3.0, 1.0], 1), ([1.0, 1.0], 3)]
STEP_2 = [0.5, 0.5]  # round 2: one client, Δ2 = [0.5, 0.5] from whatever round 1 produced
GRID = SimpleNamespace(get_node_ids=lambda: [1, 2])
COMMON = dict(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)


def record(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array(values, dtype=np.float32))})


def reply(values, num_examples: int = 1) -> Message:
    content = RecordDict({k.ARRAYS: record(list(values)),
                          k.METRICS: MetricRecord({k.NUM_EXAMPLES: num_examples, k.TRAIN_LOSS: 1.0})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def two_rounds(strategy) -> tuple[np.ndarray, np.ndarray]:
    """Run rounds 1 and 2 as the round loop does; return the global adapter after each."""
    strategy.configure_train(1, record(X0), ConfigRecord(), GRID)
    x1, _ = strategy.aggregate_train(1, [reply(v, n) for v, n in ROUND_1])
    x1 = x1["w"].numpy()
    strategy.configure_train(2, record(list(x1)), ConfigRecord(), GRID)
    x2, _ = strategy.aggregate_train(2, [reply(x1 + np.array(STEP_2, dtype=np.float32))])
    return x1, x2["w"].numpy()


def test_fedadam_two_steps_by_hand():
    # β1 = 0.5, β2 = 0.75, τ = 0.5, η = 0.1; Flower bias-corrects with t = round + 1.
    x1, x2 = two_rounds(FedAdam(eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, **COMMON))
    # Round 1: m = 0.5 Δ1 = [0.25, -0.5]; v = 0.25 Δ1² = [0.0625, 0.25], √v = [0.25, 0.5]
    #          η1 = 0.1 √(1 - 0.75²) / (1 - 0.5²) = 0.1 √0.4375 / 0.75
    eta1 = 0.1 * math.sqrt(0.4375) / 0.75
    np.testing.assert_allclose(x1, [1.0 + eta1 * 0.25 / 0.75, 2.0 - eta1 * 0.5 / 1.0], rtol=1e-6)
    # Round 2: m = 0.5 m + 0.5 Δ2 = [0.375, 0.0]; v = 0.75 v + 0.25 Δ2² = [0.109375, 0.25]
    #          η2 = 0.1 √(1 - 0.75³) / (1 - 0.5³) = 0.1 √0.578125 / 0.875
    eta2 = 0.1 * math.sqrt(0.578125) / 0.875
    np.testing.assert_allclose(x2, [x1[0] + eta2 * 0.375 / (math.sqrt(0.109375) + 0.5), x1[1]], rtol=1e-6)
    assert x1.dtype == x2.dtype == np.float32  # Flower's FedAdam would return float64


def test_fedyogi_two_steps_by_hand():
    x1, x2 = two_rounds(FedYogi(eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, **COMMON))
    # Round 1: m = [0.25, -0.5]; v = 0 - 0.25 Δ1² sign(0 - Δ1²) = [0.0625, 0.25]; no bias correction
    np.testing.assert_allclose(x1, [1.0 + 0.1 * 0.25 / 0.75, 2.0 - 0.1 * 0.5 / 1.0], rtol=1e-6)
    # Round 2: Δ2² = [0.25, 0.25]; v = v - 0.25 Δ2² sign(v - Δ2²) = [0.0625 + 0.0625, 0.25 - 0] = [0.125, 0.25]
    #          m = [0.375, 0.0]
    np.testing.assert_allclose(x2, [x1[0] + 0.1 * 0.375 / (math.sqrt(0.125) + 0.5), x1[1]], rtol=1e-6)
    assert x2.dtype == np.float32


def test_fedavgm_two_steps_by_hand():
    x1, x2 = two_rounds(FedAvgM(server_learning_rate=0.5, server_momentum=0.9, **COMMON))
    # Round 1: g = x - mean = [-0.5, 1.0]; b = g; x1 = x - 0.5 b = [1.25, 1.5]
    np.testing.assert_allclose(x1, [1.25, 1.5], rtol=1e-6)
    # Round 2: g = -Δ2 = [-0.5, -0.5]; b = 0.9 [-0.5, 1.0] + g = [-0.95, 0.4]; x2 = x1 - 0.5 b = [1.725, 1.3]
    np.testing.assert_allclose(x2, [1.725, 1.3], rtol=1e-6)


def test_fedavgm_steps_from_the_arrays_sent_this_round():
    """Flower's FedAvgM would step from its own last output, not from what was sent."""
    strategy = FedAvgM(server_learning_rate=0.5, server_momentum=0.0, **COMMON)
    strategy.configure_train(1, record(X0), ConfigRecord(), GRID)
    strategy.aggregate_train(1, [reply(v, n) for v, n in ROUND_1])  # -> [1.25, 1.5]
    strategy.configure_train(2, record([0.0, 0.0]), ConfigRecord(), GRID)  # e.g. restored from a checkpoint
    x2, _ = strategy.aggregate_train(2, [reply([1.0, -1.0])])
    np.testing.assert_allclose(x2["w"].numpy(), [0.5, -0.5])  # 0 + 0.5 (update [1, -1]), no momentum


@pytest.mark.parametrize("name, lr", [("fedadam", 0.01), ("fedyogi", 0.01), ("fedavgm", 1.0)])
def test_build_strategy_uses_the_configured_optimizer_and_its_default_step(name, lr):
    cfg = FedtuneConfig().with_overrides({"strategy.name": name})
    strategy = build_strategy(cfg)
    assert type(strategy) is {"fedadam": FedAdam, "fedyogi": FedYogi, "fedavgm": FedAvgM}[name]
    assert (strategy.server_learning_rate if name == "fedavgm" else strategy.eta) == lr
    explicit = build_strategy(cfg.with_overrides({"strategy.server_learning_rate": 0.3}))
    assert (explicit.server_learning_rate if name == "fedavgm" else explicit.eta) == 0.3


@pytest.mark.parametrize("make", [
    lambda: FedAdam(eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, **COMMON),
    lambda: FedYogi(eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, **COMMON),
    lambda: FedAvgM(server_learning_rate=0.5, server_momentum=0.9, **COMMON),
])
def test_state_survives_a_checkpoint_and_resume_continues_the_same_optimizer(make, tmp_path):
    uninterrupted = make()
    _, expected = two_rounds(uninterrupted)

    first = make()
    first.configure_train(1, record(X0), ConfigRecord(), GRID)
    x1 = first.aggregate_train(1, [reply(v, n) for v, n in ROUND_1])[0]
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    run.commit(Checkpoint(1, dict(x1.to_torch_state_dict()), ledger=PrivacyLedger("prv", False).to_dict(),
                          optimizer_state=state_dict(first)["server_optimizer"]))

    checkpoint = run.latest_checkpoint()
    assert set(checkpoint.optimizer_state) == {f"{a}/w" for a in type(first).STATE}
    for resumed, restored in ((make(), True), (make(), False)):
        if restored:
            load_state_dict(resumed, {"server_optimizer": checkpoint.optimizer_state})
        x1 = checkpoint.arrays["w"].numpy()
        resumed.configure_train(2, record(list(x1)), ConfigRecord(), GRID)
        x2 = resumed.aggregate_train(2, [reply(x1 + np.array(STEP_2, dtype=np.float32))])[0]["w"].numpy()
        if restored:
            np.testing.assert_array_equal(x2, expected)
        else:  # without the moments the second step differs: the state matters
            assert not np.allclose(x2, expected, rtol=1e-4)


def test_restore_finds_the_optimizer_under_a_wrapper_and_refuses_a_foreign_state():
    cfg = FedtuneConfig().with_overrides({"strategy.name": "fedadam", "strategy.robust": "median"})
    wrapped = build_strategy(cfg)
    load_state_dict(wrapped, {"server_optimizer": {"m_t/w": torch.zeros(2), "v_t/w": torch.ones(2)}})
    np.testing.assert_array_equal(wrapped.strategy.v_t["w"], [1.0, 1.0])
    with pytest.raises(FedtuneError, match="not FedAdam's"):
        load_state_dict(wrapped, {"server_optimizer": {"momentum_vector/w": torch.zeros(2)}})
    with pytest.raises(FedtuneError, match="server_optimizer.*does not use"):
        load_state_dict(build_strategy(FedtuneConfig()), {"server_optimizer": {"m_t/w": torch.zeros(2)}})
    assert state_dict(build_strategy(FedtuneConfig())) == {}
