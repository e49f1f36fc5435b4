import math

import pytest

from fedtune.config import DPConfig, FedtuneConfig, LoraConfig, dump_config, given_keys, load_config
from fedtune.errors import ConfigError


def test_defaults_are_the_documented_demo():
    cfg = FedtuneConfig()
    assert (cfg.clients, cfg.rounds, cfg.dp.enabled, cfg.strategy.name) == (10, 3, True, "fedavg")


@pytest.mark.parametrize("make, option", [
    (lambda: LoraConfig(r=0), "lora.r"),
    (lambda: DPConfig(noise_multiplier=-1), "dp.noise_multiplier"),
    (lambda: DPConfig(delta=2.0), "dp.delta"),
    (lambda: DPConfig(epsilon_budget=-1), "dp.epsilon_budget"),  # not blamed on the target ε it was compared with
    (lambda: FedtuneConfig(clients=0), "clients"),
    (lambda: DPConfig(public_streams=True, reproducible_noise=True), "dp.public_streams"),
    (lambda: DPConfig(public_streams=True, enabled=False), "dp.public_streams"),
])
def test_invalid_values_name_the_option(make, option):
    with pytest.raises(ConfigError, match=f"`{option}`"):
        make()


def test_toml_round_trip_keeps_every_value(tmp_path):
    cfg = FedtuneConfig().with_overrides({"lora.r": 4, "dp.noise_multiplier": 0.7, "strategy.name": "fedprox"})
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert 'fedtune_version = "' in path.read_text()


def test_flat_round_trip_for_flower_run_config():
    cfg = FedtuneConfig().with_overrides({"lora.target_modules": "query,value", "rounds": 7})
    flat = cfg.to_flat()
    assert flat["lora.target_modules"] == ["query", "value"]
    assert FedtuneConfig.from_flat(flat) == cfg


def test_unknown_and_mistyped_options_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="Unknown option `lora.rank`"):
        FedtuneConfig.from_flat({"lora.rank": 4})
    with pytest.raises(ConfigError, match="`rounds`.*whole number"):
        FedtuneConfig.from_flat({"rounds": "three"})
    with pytest.raises(ConfigError, match="`strategy.name`.*fedavg, fedprox"):
        FedtuneConfig.from_flat({"strategy.name": "fedsgd"})
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_a_config_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Windows editors may start a UTF-8 file with a byte-order mark, which tomllib calls an invalid statement."""
    marked = tmp_path / "bom.toml"
    marked.write_bytes("\ufeffrounds = 4\n".encode())
    assert load_config(marked).rounds == 4
    assert "rounds" in given_keys(marked, {})


def test_int_accepted_for_float_but_bool_is_not_a_number():
    assert FedtuneConfig.from_flat({"dp.noise_multiplier": 1}).dp.noise_multiplier == 1.0
    with pytest.raises(ConfigError):
        FedtuneConfig.from_flat({"dp.noise_multiplier": True})


@pytest.mark.parametrize("option", ["dp.max_grad_norm", "dp.noise_multiplier", "dp.target_epsilon",
                                    "strategy.proximal_mu", "dp.client_noise_multiplier",
                                    "strategy.server_learning_rate", "train.learning_rate"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_infinite_or_nan_values_are_refused_at_the_boundary(option, value):
    """They used to pass, and clients spent ε before the round failed (--target-epsilon inf ran at σ = 10)."""
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        FedtuneConfig().with_overrides({option: value})


def test_inf_means_no_limit_only_where_documented_and_absurd_server_steps_are_refused():
    cfg = FedtuneConfig().with_overrides({"dp.epsilon_budget": math.inf, "strategy.max_update_norm": math.inf})
    assert math.isinf(cfg.dp.epsilon_budget) and math.isinf(cfg.strategy.max_update_norm)
    with pytest.raises(ConfigError, match="server_learning_rate"):
        FedtuneConfig().with_overrides({"strategy.name": "fedadam", "strategy.server_learning_rate": 1e308})
    with pytest.raises(ConfigError, match="finite"):
        FedtuneConfig.from_nested({"dp": {"noise_multiplier": math.inf}}, source="run.toml")


def test_clients_are_sent_only_what_they_train_by_and_rebuild_it_exactly():
    cfg = FedtuneConfig().with_overrides({"rounds": 7, "clients": 12, "strategy.clients_per_round": 4,
                                          "strategy.name": "fedadam", "round_timeout_s": 90.0, "out": "/srv/run",
                                          "dp.target_epsilon": 8.0, "lora.r": 8, "data.demo_examples": 300})
    sent = cfg.client_flat()
    assert not {"strategy.name", "round_timeout_s", "out", "num_cpus_per_client"} & set(sent)
    rebuilt = FedtuneConfig.from_flat(sent)
    assert (rebuilt.model, rebuilt.lora, rebuilt.train, rebuilt.dp, rebuilt.data, rebuilt.seed) == (
        cfg.model, cfg.lora, cfg.train, cfg.dp, cfg.data, cfg.seed)
    assert rebuilt.rounds_per_client() == cfg.rounds_per_client() == 3  # a target ε is spent over these


def test_a_file_is_validated_together_with_the_command_line_options(tmp_path):
    """A file that is complete only with an option (its user column, with --data) is a valid run."""
    path = tmp_path / "run.toml"
    path.write_text('[dp]\nunit = "user"\n[data]\nuser_column = "patient_id"\n')
    with pytest.raises(ConfigError, match="data.user_column"):
        load_config(path)  # alone: a user column for the demo data
    cfg = load_config(path, {"data.path": "notes.csv", "rounds": None})
    assert (cfg.dp.unit, cfg.data.user_column, cfg.data.path, cfg.rounds) == ("user", "patient_id", "notes.csv", 3)
    assert load_config(None, {"rounds": 5}).rounds == 5 and load_config(None) == FedtuneConfig()


def test_gradient_canaries_need_record_level_dp_and_one_rank():
    base = {"data.canaries": 50, "data.canary_kind": "gradient"}
    assert FedtuneConfig.from_flat(base).data.canary_kind == "gradient"
    user = {"dp.unit": "user", "data.user_column": "patient", "data.path": "x.csv"}
    for other in (user, {"lora.client_ranks": "2,4"}):
        with pytest.raises(ConfigError, match="`data.canary_kind`.*use `input` canaries"):
            FedtuneConfig.from_flat({**base, **other})
    with pytest.raises(ConfigError, match="`data.canary_kind`.*input, gradient"):
        FedtuneConfig.from_flat({"data.canary_kind": "dirac"})


def test_early_stopping_is_refused_under_dp_and_without_client_validation():
    with pytest.raises(ConfigError, match="`early_stopping_patience`.*neither DP-SGD nor client-level DP"):
        FedtuneConfig.from_flat({"early_stopping_patience": 3})
    with pytest.raises(ConfigError, match="`early_stopping_patience`.*neither DP-SGD nor client-level DP"):
        # client-level DP covers the released adapters, not a stop chosen from noise-free validation losses
        FedtuneConfig.from_flat({"early_stopping_patience": 3, "dp.enabled": False, "dp.client_dp": "fixed",
                                 "dp.client_noise_multiplier": 1.0})
    for missing in ({"strategy.fraction_evaluate": 0.0}, {"data.client_val_fraction": 0.0}):
        with pytest.raises(ConfigError, match="`early_stopping_patience`.*needs the clients' validation loss"):
            FedtuneConfig.from_flat({"early_stopping_patience": 3, "dp.enabled": False, **missing})
    assert FedtuneConfig.from_flat({"early_stopping_patience": 3, "dp.enabled": False}).early_stopping_patience == 3


def test_client_level_dp_under_secagg_needs_every_institution_every_round():
    """A review's case: a Poisson cohort of one institution was left out under SecAgg+ (a noise-only release);
    whether one institution's update was summed then depended on whether another took part, a shift of up to
    2 C the Poisson analysis does not cover (ε 16.5 where the ledger said 8.25, for N = 10, q = 0.2)."""
    from fedtune.server.prepare import preflight

    base = {"clients": 10, "dp.secagg": True, "dp.client_dp": "fixed", "dp.client_dp_side": "client",
            "dp.delta": 1e-3}
    for sampled in ({"strategy.fraction_train": 0.2}, {"strategy.clients_per_round": 3}):
        earlier = FedtuneConfig.from_flat({**base, **sampled})  # a run an earlier fedtune made still loads
        with pytest.raises(ConfigError, match=r"dp.secagg.*fraction_train = 1 and no strategy.clients_per_round"):
            preflight(earlier)  # but is neither started nor continued
    assert FedtuneConfig.from_flat(base).clients_sampled() == 10


def test_a_clipping_norm_in_float32s_subnormal_range_is_refused():
    """A review: Opacus' float32 clip at C = 1e-44 rounds each coordinate to a grid step, and a clipped gradient
    over 196 coordinates came out at 1.96·C, while the noise is calibrated to C; a coordinator could send it."""
    import torch

    C, g = 1e-44, torch.ones(196) * 0.3
    clipped = g * (torch.tensor(C, dtype=torch.float32) / (g.norm() + 1e-6))
    assert float(clipped.double().norm()) > 1.5 * C, "the defect the floor keeps out"
    with pytest.raises(ConfigError, match=r"dp\.max_grad_norm"):
        FedtuneConfig().with_overrides({"dp.max_grad_norm": 1e-44})
    assert FedtuneConfig().with_overrides({"dp.max_grad_norm": 1e-6}).dp.max_grad_norm == 1e-6
    with pytest.raises(ConfigError, match=r"dp\.max_grad_norm"):
        FedtuneConfig().with_overrides({"dp.max_grad_norm": 9.99e-7})
