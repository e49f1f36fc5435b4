"""The ε budget: the projection matches what training really spends, and the cap binds."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from fedtune.client.train import train_round
from fedtune.config import DPConfig, FedtuneConfig, TrainConfig
from fedtune.data.text import TokenizedTexts
from fedtune.privacy.accountant import epsilon
from fedtune.privacy.budget import client_dp, poisson_schedule, projected_epsilon, within_budget
from fedtune.privacy.independent import independent_epsilon
from tests.privacy.noise_only import NoiseOnly


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


def test_target_epsilon_solves_sigma_that_spends_the_target_over_the_planned_rounds():
    dp = DPConfig(target_epsilon=3.0, delta=1e-5)
    n, batch, epochs, rounds = 60, 16, 2, 3
    resolved = client_dp(dp, None, n, batch, epochs, rounds)
    q, steps = poisson_schedule(n, batch, epochs)
    spent = independent_epsilon("prv", [(resolved.noise_multiplier, q, steps)] * rounds, dp.delta)
    assert spent == pytest.approx(3.0, rel=0.01) and spent <= 3.0 * 1.001
    assert resolved.epsilon_budget == 3.0, "the target caps the budget"
    assert all(within_budget(resolved, [(resolved.noise_multiplier, q, steps)] * r, n, batch, epochs)
               for r in range(rounds))
    assert not within_budget(resolved, [(resolved.noise_multiplier, q, steps)] * rounds, n, batch, epochs)
    assert client_dp(dp, 2.5, n, batch, epochs, rounds).noise_multiplier == 2.5, "a solved sigma is kept"
    assert client_dp(DPConfig(noise_multiplier=0.7), None, n, batch, epochs, rounds).noise_multiplier == 0.7


@pytest.mark.parametrize("batches", [93, 99, 211])  # where int(1 / (1 / k)) is k - 1 in floating point
def test_training_runs_the_schedule_the_forecast_plans(batches):
    """Opacus' own Poisson loader runs int(1/q) steps: k - 1 of them, accounted at q = 1/(k-1), for
    about 6% of batch counts k. The budget forecast plans k steps at 1/k; training must run exactly
    that, or a client under a target ε declines a round it planned."""
    data = TokenizedTexts(tuple((i % 4,) for i in range(batches)), (0,) * batches)
    cfg = FedtuneConfig(clients=1, train=TrainConfig(batch_size=1, optimizer="sgd", learning_rate=1.0),
                        dp=DPConfig(noise_multiplier=1.0, delta=1e-3, accountant="rdp"))
    result = train_round(NoiseOnly(), data, cfg, [], proximal_mu=0.0, seed=0)
    assert (result.sample_rate, result.steps) == poisson_schedule(batches, 1, 1) == (1 / batches, batches)
    assert result.history == [(1.0, 1 / batches, batches)]
    assert epsilon("rdp", result.history, 1e-3) == projected_epsilon(cfg.dp, [], batches, 1, 1)


def test_a_target_epsilon_is_spent_over_the_rounds_a_client_is_expected_to_train():
    """With 2 of 10 clients sampled a round, a client trains in about 2 of 10 rounds: solving σ for
    all 10 spent far less than the target."""
    from flwr.app import ConfigRecord

    from fedtune.client.app import _round_config
    from fedtune.client.state import ClientState

    cfg = FedtuneConfig.from_flat({"rounds": 10, "clients": 10, "strategy.clients_per_round": 2,
                                   "dp.target_epsilon": 4.0, "train.batch_size": 16})
    assert cfg.rounds_per_client() == 2
    solved = _round_config(cfg, ConfigRecord({}), ClientState(), 64).dp.noise_multiplier
    q, steps = poisson_schedule(64, 16, 1)
    assert independent_epsilon("prv", [(solved, q, steps)] * 2, cfg.dp.delta) == pytest.approx(4.0, rel=0.02)
    assert FedtuneConfig.from_flat({"rounds": 3}).rounds_per_client() == 3  # everyone every round


class MeanOfRows(torch.nn.Module):
    """loss = the batch's mean of each record's embedding row summed: every record's gradient is a row of
    ones (norm 4, below a clipping norm of 100), so one step's update counts the records it sampled."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(4, 16)
        self.sizes: list[int] = []

    def forward(self, input_ids, attention_mask, labels):
        self.sizes.append(len(input_ids))
        return SimpleNamespace(loss=self.embedding(input_ids[:, 0]).sum() / len(input_ids))


def test_a_sample_rate_makes_a_round_one_step_at_that_rate_averaged_over_its_expected_batch():
    """train.sample_rate q: one Poisson step at q, whatever n and the batch size; Opacus accounts q (not
    1 / len(loader) = 1), and the step divides the clipped sum by q·n, so n·Δ = −(lr/q)·(Σ clipped
    gradients + noise) at every institution alike, as distributed DP's sum needs."""
    n, q = 400, 0.25
    data = TokenizedTexts(tuple((i % 4,) for i in range(n)), (0,) * n)
    cfg = FedtuneConfig(clients=1, train=TrainConfig(sample_rate=q, optimizer="sgd", learning_rate=1.0),
                        dp=DPConfig(noise_multiplier=0.0, max_grad_norm=100.0, delta=1e-3, accountant="rdp"))
    model = MeanOfRows()
    before = model.embedding.weight.detach().clone()
    result = train_round(model, data, cfg, [], proximal_mu=0.0, seed=0)
    assert (result.sample_rate, result.steps) == poisson_schedule(n, cfg.train.batch_size, 1, q) == (q, 1)
    assert result.history == [(0.0, q, 1)]
    (sampled,) = model.sizes
    assert 60 < sampled < 140, "a Poisson sample of about q·n records"
    moved = (model.embedding.weight.detach() - before)[:, 0].sum().item()
    assert n * moved == pytest.approx(-sampled / q, rel=1e-5)


def test_a_sample_rate_solves_sigma_for_one_step_a_round_at_that_rate():
    from opacus.accountants.utils import get_noise_multiplier

    dp = DPConfig(target_epsilon=8.0, delta=1e-5)
    solved = client_dp(dp, None, 1000, 16, 1, 120, sample_rate=0.25)
    independent = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.25, steps=120,
                                       accountant=dp.accountant)
    assert solved.noise_multiplier == pytest.approx(independent, rel=0.01)
    assert independent_epsilon("prv", [(solved.noise_multiplier, 0.25, 1)] * 120, 1e-5) == pytest.approx(8.0, rel=0.01)
    assert projected_epsilon(solved, [], 1000, 16, 1, 0.25) == epsilon(
        dp.accountant, [(solved.noise_multiplier, 0.25, 1)], 1e-5), "one round: one step at q, whatever the batch"


@pytest.mark.parametrize("flat, key", [
    ({"train.sample_rate": 1.5}, "train.sample_rate"),
    ({"train.sample_rate": 0.25, "train.local_epochs": 2}, "train.local_epochs"),
    ({"train.sample_rate": 0.25, "dp.enabled": False}, "train.sample_rate"),
    ({"train.sample_rate": 0.25, "dp.public_streams": True}, "train.sample_rate"),
])
def test_a_sample_rate_is_checked_at_the_boundary(flat, key):
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FedtuneConfig.from_flat(flat)
