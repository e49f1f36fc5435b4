"""The ε budget: the projection matches what training really spends, and the cap binds."""

import dataclasses
import math

import pytest

from fedtune.client.train import train_round
from fedtune.config import DPConfig, TrainConfig
from fedtune.privacy.accountant import epsilon
from fedtune.privacy.budget import poisson_schedule, projected_epsilon, within_budget


@pytest.mark.parametrize("n, batch, epochs, expected", [
    (100, 10, 1, (0.1, 10)), (101, 10, 2, (1 / 11, 22)), (5, 16, 1, (1.0, 1)),
])
def test_poisson_schedule(n, batch, epochs, expected):
    q, steps = poisson_schedule(n, batch, epochs)
    assert q == pytest.approx(expected[0]) and steps == expected[1]


def test_projection_equals_what_a_round_of_training_spends(tiny_model, tokenized, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, dp=DPConfig(noise_multiplier=1.2, accountant="rdp"),
                              train=TrainConfig(batch_size=20, local_epochs=2, learning_rate=1e-3))
    projected = projected_epsilon(cfg.dp, [], len(tokenized), 20, 2)
    result = train_round(tiny_model, tokenized, cfg, [], proximal_mu=0.0, seed=0)
    assert epsilon("rdp", result.history, cfg.dp.delta) == pytest.approx(projected, rel=1e-9)
    assert (result.sample_rate, result.steps) == pytest.approx(poisson_schedule(len(tokenized), 20, 2))


def test_cap_refuses_the_round_that_would_cross_it():
    dp = DPConfig(noise_multiplier=1.0, accountant="rdp", epsilon_budget=8.0)
    assert projected_epsilon(dp, [], 200, 20, 1) < 8.0 and within_budget(dp, [], 200, 20, 1)
    history = []
    while within_budget(dp, history, 200, 20, 1):
        history.append((1.0, 0.1, 10))  # one round: q = 20/200, 10 steps
    assert len(history) >= 2
    assert epsilon("rdp", history, dp.delta) <= 8.0 < projected_epsilon(dp, history, 200, 20, 1)
    assert within_budget(DPConfig(epsilon_budget=math.inf), history * 100, 200, 20, 1)
