"""One source of truth for options: every config field can be set from the command line, a TOML
config file and `flwr run --run-config`, and errors name it the way the user set it."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import tomli_w
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.config import AUTO, RECIPE_KEYS, FedtuneConfig, load_config
from fedtune.options import AUDIT, DEPLOY, NO_OPTION, NOT_DEPLOYED, OPTIONS, SIMULATE, explain

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# Values that the generic rule below would make invalid, and options a value needs beside it.
EXAMPLES: dict[str, Any] = {"lora.client_ranks": "2", "data.encoding": "latin-1", "data.labels": ("a", "b"),
                          "model.task": "causal-lm", "simulation.ray_address": "127.0.0.1:6379",
                          "dp.distributed_min_honest": 2}
ALONGSIDE: dict[str, dict[str, Any]] = {
    "train.length_buckets": {"dp.enabled": False}, "data.canary_repeats": {"dp.enabled": False},
    "early_stopping_patience": {"dp.enabled": False},
    "cooldown_rounds": {"dp.enabled": False, "early_stopping_patience": 2},
    "data.partition_column": {"data.path": "notes.csv"}, "data.source": {"data.path": "notes.csv"},
    "data.user_column": {"data.path": "notes.csv"}, "dp.unit": {"data.path": "notes.csv", "data.user_column": "pid"},
    "dp.canary_clients": {"dp.client_dp": "fixed", "dp.delta": 1e-3},
    "dp.distributed_min_honest": {"dp.secagg": True},
}


def _set(cfg: FedtuneConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def _fields(cls: type = FedtuneConfig, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, type, default) of every config field."""
    found, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", hints[f.name], _set(FedtuneConfig(), f"{prefix}{f.name}")))
    return found


FIELDS = _fields()


def _example(key: str, annotation: Any, default: Any) -> Any:
    """A valid value other than the default."""
    if key in EXAMPLES:
        return EXAMPLES[key]
    if typing.get_origin(annotation) is Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != default)
    if annotation is bool:
        return not default
    if annotation is int:
        return default + 1
    if annotation is float:
        return 8.0 if math.isinf(default) else default / 2 if default else 0.5
    return ("x",) if typing.get_origin(annotation) is tuple else "x"


def test_every_field_is_known():
    assert {key for key, _, _ in FIELDS} == set(FedtuneConfig().to_flat())


@pytest.mark.parametrize("key, annotation, default", FIELDS, ids=[key for key, _, _ in FIELDS])
def test_the_command_line_sets_every_field_or_says_why_not(monkeypatch, key, annotation, default):
    assert (key in OPTIONS) != (key in NO_OPTION), f"{key}: give it an option, or a reason in NO_OPTION"
    if key in NO_OPTION:
        return
    value = _example(key, annotation, default)
    got = {}
    monkeypatch.setattr("fedtune.cli._simulate", lambda config, out, resume, overrides: got.update(
        {name: given for name, given in overrides.items() if given is not None}))
    flag = OPTIONS[key].flag
    args = ([flag.split("/")[0] if value else flag.split("/")[1]] if annotation is bool else
            [flag, ",".join(value) if isinstance(value, tuple) else str(value)])
    result = CliRunner().invoke(cli, ["simulate", *args])
    assert result.exit_code == 0, result.output
    assert _set(FedtuneConfig().with_overrides({**ALONGSIDE.get(key, {}), **got}), key) == value


@pytest.mark.parametrize("key, annotation, default", FIELDS, ids=[key for key, _, _ in FIELDS])
def test_a_config_file_sets_every_field(tmp_path, key, annotation, default):
    value = _example(key, annotation, default)
    nested: dict[str, Any] = {}
    for name, item in {**ALONGSIDE.get(key, {}), key: value}.items():
        section, _, field = name.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[field] = list(item) if isinstance(item, tuple) else item
    (tmp_path / "run.toml").write_text(tomli_w.dumps(nested))
    assert _set(load_config(tmp_path / "run.toml"), key) == value


@pytest.mark.parametrize("key, annotation, default", FIELDS, ids=[key for key, _, _ in FIELDS])
def test_flwr_run_config_sets_every_field(key, annotation, default):
    """pyproject.toml declares each key with its default: `flwr run --run-config` sets only those."""
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert key in declared, f"declare {key} in pyproject.toml's [tool.flwr.app.config]"
    as_run_config = (lambda v: ",".join(v) if isinstance(v, tuple) else v)  # noqa: E731 (no lists in run config)
    assert declared[key] == (AUTO if key in RECIPE_KEYS else as_run_config(default))
    value = _example(key, annotation, default)
    flat = {**declared, **ALONGSIDE.get(key, {}), key: as_run_config(value)}
    cfg, given = FedtuneConfig.from_run_config(flat)
    assert _set(cfg, key) == value and key in given


def test_the_declared_run_config_is_the_default_config():
    """`flwr run .` trains the same recipe as `fedtune simulate`: what the recipe may choose is left to it."""
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    cfg, given = FedtuneConfig.from_run_config(declared)
    assert cfg == FedtuneConfig() and not given & RECIPE_KEYS


def test_a_run_config_value_equal_to_the_default_is_still_given():
    """`flwr run --run-config rounds=3` keeps 3 rounds, though 3 is the default: the recipe never overrides it."""
    from fedtune.server.prepare import resolve

    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    cfg, given = FedtuneConfig.from_run_config({**declared, "rounds": 3, "dp.enabled": False, "clients": 4,
                                                "data.demo_examples": 200})
    assert "rounds" in given and "train.batch_size" not in given
    chosen = resolve(cfg, given)
    assert chosen.rounds == 3 and any(note.startswith("train.batch_size") for note in chosen.recipe.chosen)


def test_audit_and_deploy_local_take_options_from_the_same_table():
    from fedtune.tasks.classification import STEP_KEYS

    assert set(AUDIT) < set(SIMULATE) and set(DEPLOY) == set(SIMULATE) - set(NOT_DEPLOYED)
    assert STEP_KEYS < set(AUDIT)  # an auditor can set every option that shapes a DP-SGD step
    for command in ("simulate", "audit", "deploy-local"):
        result = CliRunner().invoke(cli, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--delta" in result.output and "Differential privacy" in result.output


def test_deploy_local_passes_its_run_options_as_overrides(monkeypatch):
    calls = []
    monkeypatch.setattr("fedtune.deploy.run.deploy_local", lambda *args, **kwargs: calls.append(kwargs) or (None, 0))
    result = CliRunner().invoke(cli, ["deploy-local", "--task", "causal-lm", "--nodes", "2", "--rounds", "1",
                                      "--no-dp", "--lora-alpha", "16"])
    assert result.exit_code == 0, result.output
    given = {key: value for key, value in calls[0]["overrides"].items() if value is not None}
    assert given == {"model.task": "causal-lm", "rounds": 1, "dp.enabled": False, "lora.alpha": 16.0}


def test_errors_name_the_config_key_and_the_cli_adds_its_flag():
    said = explain("Invalid option `dp.delta`: below 1/clients; set `dp.delta` to 1e-6, or raise "
                   "strategy.clients_per_round. See data.csv and `--resume`.")
    assert said == ("Invalid option `dp.delta` (--delta): below 1/clients; set `dp.delta` to 1e-6, or raise "
                    "strategy.clients_per_round (--clients-per-round). See data.csv and `--resume`.")
    result = CliRunner().invoke(cli, ["simulate", "--secagg", "--client-dp", "fixed"])
    assert result.exit_code == 2
    assert "`dp.secagg` (--secagg/--no-secagg)" in " ".join(result.output.split())
