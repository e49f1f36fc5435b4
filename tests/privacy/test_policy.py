"""An institution's own privacy policy (node config) bounds what the server's message may ask."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fedtune import constants as k
from fedtune.config import DPConfig, FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.privacy.budget import within_budget
from fedtune.privacy.policy import PrivacyPolicy, node_policy

OWN_FILE = {"data-path": "/data/notes.csv", "state-dir": "/secure/fedtune", "client-name": "clinic-a"}  # an institution


def policy(cfg: FedtuneConfig | None = None, server_dir: str = "runs/x/client_state", **node) -> PrivacyPolicy:
    return node_policy(node, cfg or FedtuneConfig(), server_dir)


def request(**dp) -> DPConfig:
    return dataclasses.replace(DPConfig(), **dp)


def test_an_institution_reading_its_own_file_has_strict_defaults():
    own = policy(**OWN_FILE)
    assert (own.source, own.state_dir, own.require_dp, own.allow_reproducible_noise) == \
        ("node config", "/secure/fedtune", True, False)
    assert own.refusal(request(), 1000) is None


@pytest.mark.parametrize("key, near", [("epsilon_budget", "epsilon-budget"), ("min_noise_multiplier",
                                                                              "min-noise-multiplier"),
                                       ("Require-DP", "require-dp"), ("max-noise-sharer", "max-noise-sharers")])
def test_a_misspelled_limit_in_the_node_config_is_refused_not_ignored(key, near):
    """A review: `epsilon_budget = 2.0` (the run config's spelling) was ignored without a word, and the
    institution trained with no cap of its own."""
    with pytest.raises(ConfigError, match=f"`{key}`: did you mean `{near}`"):
        policy(**OWN_FILE, **{key: 2.0})
    assert policy(**OWN_FILE, **{"another-apps-key": 1}).source == "node config", "other keys pass"


def test_an_institution_without_a_node_local_state_dir_refuses():
    reason = policy(**{"data-path": "/data/notes.csv", "client-name": "clinic-a"}).refusal(request(), 1000)
    assert "state-dir" in reason


def test_a_node_on_the_runs_data_without_a_state_dir_refuses_dp_training_outside_simulation():
    """A review: outside simulation the server names no state directory, so a `partition-id` node without
    `state-dir` kept its privacy history only in its SuperNode's memory; a restart after spending the ledger
    never recorded (a reply that timed out) started its ε again from 0 without a word."""
    partition = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}
    reason = policy(server_dir="", **partition).refusal(request(), 1000)
    assert "state-dir" in reason and "from nothing" in reason
    assert policy(server_dir="", **partition, **{"state-dir": "/srv/state"}).refusal(request(), 1000) is None
    assert policy(**partition).refusal(request(), 1000) is None, "in simulation the server names one"
    without_dp = policy(FedtuneConfig.from_flat({"dp.enabled": False}), server_dir="", **partition)
    assert without_dp.refusal(request(enabled=False), 1000) is None, "no ε to lose"


def test_an_institution_without_a_client_name_refuses():
    """Its state would be filed under its node id, which a new registration changes: ε from nothing."""
    reason = policy(**{"data-path": "/data/notes.csv", "state-dir": "/secure/fedtune"}).refusal(request(), 1000)
    assert "client-name" in reason and "restart from nothing" in reason
    assert policy(**{k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}).refusal(request(), 1000) is None, \
        "a node on the run's own data is named by its partition"


@pytest.mark.parametrize("asked, says", [
    (dict(enabled=False), "dp.enabled = false"),
    (dict(noise_multiplier=0.0), "dp.noise_multiplier = 0"),
    (dict(reproducible_noise=True), "allow-reproducible-noise"),
    (dict(delta=0.3), "above `max-delta` = 1e-05"),
    (dict(delta=0.9e-3), "above `max-delta` = 1e-05"),  # just under 1/n: by default, too
])
def test_whatever_the_server_asks_an_institution_never_trains_under_weaker_protection(asked, says):
    """The review's cases: dp.enabled=false, reproducible noise and δ = 0.3 from the server."""
    reason = policy(**OWN_FILE).refusal(request(**asked), 1000)
    assert reason is not None and says in reason


def test_delta_must_be_below_one_over_n_whatever_the_institution_allows():
    loose = policy(**OWN_FILE, **{"max-delta": 0.5})
    assert "not below 1/n" in loose.refusal(request(delta=0.3), 1000)
    assert loose.refusal(request(delta=1e-4), 1000) is None


def test_own_limits_on_delta_and_sigma():
    strict = policy(**OWN_FILE, **{"max-delta": 1e-6, "min-noise-multiplier": 0.8})
    assert "max-delta" in strict.refusal(request(delta=1e-5), 100)
    assert "min-noise-multiplier" in strict.refusal(request(delta=1e-7, noise_multiplier=0.5), 100)
    assert strict.refusal(request(delta=1e-7, noise_multiplier=0.8), 100) is None


def test_an_institution_may_require_user_level_dp():
    hospital = policy(**OWN_FILE, **{"privacy-unit": "user", "max-delta": 0.5})
    reason = hospital.refusal(request(), 1000)
    assert "dp.unit = record" in reason and "privacy-unit" in reason
    assert hospital.refusal(request(unit="user"), 1000) is None
    assert "not below 1/n for this institution's n = 20 training users" in hospital.refusal(
        request(unit="user", delta=0.1), 20)
    assert policy(**OWN_FILE).refusal(request(unit="user"), 1000) is None  # either unit by default
    with pytest.raises(ConfigError, match="privacy-unit.*\"user\""):
        policy(**OWN_FILE, **{"privacy-unit": "patient"})


def test_an_institution_may_allow_what_it_chooses():
    relaxed = policy(**OWN_FILE, **{"require-dp": False, "allow-reproducible-noise": True})
    assert relaxed.refusal(request(enabled=False), 100) is None
    assert relaxed.refusal(request(reproducible_noise=True), 100) is None


def test_a_partition_of_the_runs_own_data_follows_the_run_config():
    """Simulation (and any node training on the run's own dataset): the data is the server's."""
    cfg = FedtuneConfig.from_nested({"dp": {"enabled": False}})
    simulated = policy(cfg, **{"partition-id": 0, "num-partitions": 3})
    assert (simulated.source, simulated.state_dir, simulated.require_dp) == \
        ("run config", "runs/x/client_state", False)
    assert simulated.refusal(cfg.dp, 100) is None
    pinned = policy(cfg, **{"partition-id": 0, "num-partitions": 3, "require-dp": True})  # a key set by its operator
    assert pinned.source == "run config and node config" and "require-dp" in pinned.refusal(cfg.dp, 100)


@pytest.mark.parametrize("run_budget, own, applied", [(math.inf, 4.0, 4.0), (3.0, 8.0, 3.0), (math.inf, 2, 2.0)])
def test_the_lower_of_the_two_budgets_applies(run_budget, own, applied):
    dp = request(epsilon_budget=run_budget)
    assert policy(**OWN_FILE, **{"epsilon-budget": own}).tighten(dp, 1).epsilon_budget == applied


def test_a_run_target_above_the_institutions_budget_is_lowered_to_it():
    dp = policy(**OWN_FILE, **{"epsilon-budget": 3.0}).tighten(request(target_epsilon=8.0), 1)
    assert (dp.target_epsilon, dp.epsilon_budget) == (3.0, 3.0)


def test_a_tight_node_budget_makes_the_client_decline():
    history = [(1.0, 0.1, 50)]  # one round already spent: (sigma, q, steps)
    assert within_budget(DPConfig(), history, 400, 40, 1), "the run alone has no cap"
    capped = policy(**OWN_FILE, **{"epsilon-budget": 0.5}).tighten(DPConfig(), 1)
    assert not within_budget(capped, history, 400, 40, 1)


@pytest.mark.parametrize("key, bad", [("epsilon-budget", 0), ("epsilon-budget", -1.0), ("epsilon-budget", "8"),
                                      ("epsilon-budget", True), ("require-dp", "yes"), ("max-delta", 1.5),
                                      ("min-noise-multiplier", -0.1), ("state-dir", " "),
                                      ("allow-reproducible-noise", 1)])
def test_an_invalid_node_config_value_is_refused_with_its_key(key, bad):
    with pytest.raises(ConfigError, match=key):
        policy(**{**OWN_FILE, key: bad})


def test_under_distributed_dp_a_tighter_budget_keeps_the_runs_sigma_and_declines_sooner():
    """Each institution adds σ/√t, and the sum carries σ only if every share is of the same σ. An
    institution that solved a larger σ for its own lower budget used to record the ε of that σ while
    the sum carried less: with t = 4, ε 4.00 recorded against about 6.1 held."""
    from flwr.app import ConfigRecord

    from fedtune.client.app import _round_config
    from fedtune.client.state import ClientState

    cfg = FedtuneConfig.from_flat({"rounds": 10, "clients": 4, "dp.target_epsilon": 8.0, "dp.secagg": True,
                                   "dp.distributed_min_honest": 4, "train.optimizer": "sgd",
                                   "train.batch_size": 4096, "train.local_epochs": 1})
    tight = policy(cfg, **OWN_FILE, **{"epsilon-budget": 4.0, "max-noise-sharers": 4}).tighten(cfg.dp, 10)
    assert tight.epsilon_budget == 4.0
    stale = ClientState(noise_multiplier=0.3)  # solved in another run that used this state directory
    sigmas = {_round_config(dataclasses.replace(cfg, dp=dp), ConfigRecord({}), state, 50).dp.noise_multiplier
              for dp in (cfg.dp, tight) for state in (ClientState(), stale)}
    assert len(sigmas) == 1 and sigmas.pop() > 1.0, "one σ, the run's, for every share"
    history = [(_round_config(cfg, ConfigRecord({}), ClientState(), 50).dp.noise_multiplier, 1.0, 1)] * 5
    assert within_budget(cfg.dp, history, 50, 4096, 1) and not within_budget(tight, history, 50, 4096, 1)


def test_an_institution_withholds_its_scores_under_either_kind_of_dp_unless_released():
    own, released = policy(**OWN_FILE), policy(**OWN_FILE, **{k.NODE_RELEASE_SCORES: True})
    client_level = request(enabled=False, client_dp="fixed")  # DP-SGD off: client-level DP covers neither
    assert own.withholds_scores(request()) and own.withholds_scores(client_level)
    assert own.withholds_scores(request(enabled=False)), "it trains only under DP: the message does not decide"
    assert not released.withholds_scores(request()) and not released.withholds_scores(client_level)


def test_under_distributed_dp_min_noise_multiplier_bounds_the_sums_sigma():
    """docs/privacy.md: under distributed DP `min-noise-multiplier` is the σ of the sum, the one the
    institution's ε is stated for; the share it adds itself (σ/√t, 0.5 here) may lie below it."""
    dp = request(noise_multiplier=1.0, secagg=True, distributed_min_honest=4)
    node = policy(**OWN_FILE, **{"min-noise-multiplier": 1.0, "max-noise-sharers": 4})
    assert node.refusal(dp, 50) is None
    assert "min-noise-multiplier" in node.refusal(dataclasses.replace(dp, noise_multiplier=0.9), 50)


def test_an_institution_that_trains_only_under_dp_withholds_scores_whatever_the_message_says():
    """A coordinator could send an evaluate message saying DP is off and read noise-free scores of an
    institution that refuses to train without DP (the review's case: require-dp = true, release-scores
    = false, dp.enabled = false in the message)."""
    assert policy(**OWN_FILE).withholds_scores(request(enabled=False))
    capped = policy(**OWN_FILE, **{"require-dp": False, "epsilon-budget": 8.0})
    assert capped.withholds_scores(request(enabled=False)), "an ε cap: it trains only under DP too"
    relaxed = policy(**OWN_FILE, **{"require-dp": False})
    assert not relaxed.withholds_scores(request(enabled=False)), "no DP allowed, none asked: nothing to keep out"
    simulated = policy(FedtuneConfig.from_nested({"dp": {"enabled": False}}), **{"partition-id": 0})
    assert not simulated.withholds_scores(request(enabled=False))


def test_an_epsilon_cap_refuses_a_round_without_noise_even_without_require_dp():
    """A round without noise spends ε = ∞: past any cap the institution set."""
    capped = policy(**OWN_FILE, **{"require-dp": False, "epsilon-budget": 8.0})
    for asked in (request(enabled=False), request(noise_multiplier=0.0)):
        reason = capped.refusal(capped.tighten(asked, 1), 1000)
        assert reason is not None and "epsilon-budget" in reason and "unbounded" in reason
    assert policy(**OWN_FILE, **{"require-dp": False}).refusal(request(enabled=False), 1000) is None


def test_a_no_dp_run_with_a_budget_in_its_config_still_trains_its_own_partitions():
    """The run's ε budget is no policy limit of a node on the run's own data when the run asks for no DP (a
    no-DP baseline from the same config file as the private runs trained nothing)."""
    cfg = FedtuneConfig.from_nested({"dp": {"enabled": False, "epsilon_budget": 8.0}})
    simulated = policy(cfg, **{"partition-id": 0, "num-partitions": 2})
    assert simulated.refusal(cfg.dp, 100) is None and not simulated.withholds_scores(cfg.dp)
    pinned = policy(cfg, **{"partition-id": 0, "num-partitions": 2, "epsilon-budget": 8.0})
    assert "epsilon-budget" in pinned.refusal(cfg.dp, 100), "a budget its own operator set still binds"
