"""An institution's own ε cap (node config `epsilon-budget`) can only tighten the run's."""

from __future__ import annotations

import math

import pytest
from flwr.app import Context, RecordDict

from fedtune.client.app import own_budget
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.privacy.budget import within_budget


def context(**node_config) -> Context:
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def test_without_a_node_budget_the_run_config_applies():
    cfg = FedtuneConfig()
    assert own_budget(cfg, context(**{"partition-id": 0})) is cfg


@pytest.mark.parametrize("run_budget, own, applied", [(math.inf, 4.0, 4.0), (3.0, 8.0, 3.0), (math.inf, 2, 2.0)])
def test_the_lower_of_the_two_budgets_applies(run_budget, own, applied):
    cfg = FedtuneConfig.from_nested({"dp": {"epsilon_budget": run_budget}})
    assert own_budget(cfg, context(**{"epsilon-budget": own})).dp.epsilon_budget == applied


def test_a_run_target_above_the_institutions_budget_is_lowered_to_it():
    cfg = FedtuneConfig.from_nested({"dp": {"target_epsilon": 8.0}})
    dp = own_budget(cfg, context(**{"epsilon-budget": 3.0})).dp
    assert (dp.target_epsilon, dp.epsilon_budget) == (3.0, 3.0)


def test_a_tight_node_budget_makes_the_client_decline():
    history = [(1.0, 0.1, 50)]  # one round already spent: (sigma, q, steps)
    cfg = FedtuneConfig()
    assert within_budget(cfg.dp, history, 400, 40, 1), "the run alone has no cap"
    capped = own_budget(cfg, context(**{"epsilon-budget": 0.5})).dp
    assert not within_budget(capped, history, 400, 40, 1)


@pytest.mark.parametrize("bad", [0, -1.0, "8", True])
def test_an_invalid_node_budget_is_refused_with_its_name(bad):
    with pytest.raises(ConfigError, match="epsilon-budget"):
        own_budget(FedtuneConfig(), context(**{"epsilon-budget": bad}))
