"""deploy-local's checks before anything starts: options reach the ServerApp or are refused."""

from __future__ import annotations

import pytest

from fedtune.config import FedtuneConfig
from fedtune.deploy.local import app_config_keys, app_dir, free_ports
from fedtune.deploy.run import NOT_SENT, node_names, parse_node_config, prepare_run, run_config
from fedtune.errors import ConfigError


def test_the_run_config_carries_every_declared_option_and_nothing_else():
    declared = app_config_keys(app_dir())
    cfg = FedtuneConfig().with_overrides({"rounds": 2, "clients": 3, "round_timeout_s": 60.0})
    values = run_config(cfg, declared)
    assert set(values) == declared - NOT_SENT  # the private recipe's reasons stay in the run directory
    assert (values["rounds"], values["clients"], values["round_timeout_s"]) == (2, 3, 60.0)


def test_an_option_the_app_does_not_declare_is_refused_not_dropped():
    cfg = FedtuneConfig().with_overrides({"lora.alpha": 32.0})
    with pytest.raises(ConfigError, match="lora.alpha"):
        run_config(cfg, app_config_keys(app_dir()) - {"lora.alpha"})


def test_lists_travel_comma_separated_since_flower_run_config_holds_none():
    cfg = FedtuneConfig().with_overrides({"lora.target_modules": "query,value"})
    values = run_config(cfg, app_config_keys(app_dir()))
    assert values["lora.target_modules"] == "query,value" and values["data.labels"] == ""
    assert FedtuneConfig.from_flat(values) == cfg


def test_run_options_reach_the_config(tmp_path):
    cfg, _ = prepare_run(2, tmp_path / "run", None, overrides={"rounds": 1, "lora.alpha": 16.0, "dp.delta": None})
    assert (cfg.clients, cfg.rounds, cfg.lora.alpha, cfg.dp.delta) == (2, 1, 16.0, FedtuneConfig().dp.delta)


@pytest.mark.parametrize("nodes", [0, 27])
def test_node_count_is_checked_before_anything_is_made(tmp_path, nodes, monkeypatch):
    """Through the whole command: a bad count exits 2 with no run directory and no process started
    (27 is a valid config otherwise, so without the check a deployment would start)."""
    from rich.console import Console

    from fedtune.deploy import run as deploy_run

    started = []
    monkeypatch.setattr(deploy_run.ProcessSet, "start", lambda self, *a, **kw: started.append(a))
    console = Console(record=True, width=200)
    run_dir, status = deploy_run.deploy_local(nodes, tmp_path / "run", None, 5.0, console)
    assert (run_dir, status, started) == (None, 2, [])
    assert "--nodes" in console.export_text() and not (tmp_path / "run").exists()


def test_names_and_ports():
    assert node_names(3) == ["clinic-a", "clinic-b", "clinic-c"]
    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(1024 < p < 65536 for p in ports)


def test_node_config_items_are_toml_values_for_known_keys():
    assert parse_node_config(["require-dp=true", "epsilon-budget=8", "max-delta = 1e-6", "lora-rank=2"]) == {
        "require-dp": True, "epsilon-budget": 8, "max-delta": 1e-6, "lora-rank": 2}


@pytest.mark.parametrize("item, says", [("require-dp", "KEY=VALUE"), ("state-dir=/x", "unknown key"),
                                        ("data-path=/x.csv", "unknown key"), ("colour=blue", "unknown key")])
def test_a_bad_node_config_item_is_refused(item, says):
    with pytest.raises(ConfigError, match=says):
        parse_node_config([item])


def test_a_bad_node_config_value_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="require-dp"):
        prepare_run(2, tmp_path / "run", None, node_config={"require-dp": "yes"}, overrides={"rounds": 1})
