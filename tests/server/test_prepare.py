"""One way to set a run up, whichever entry point asks (server/prepare.py)."""

from __future__ import annotations

import pytest

from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.summary import SUMMARY_FILE
from fedtune.errors import ConfigError
from fedtune.server.prepare import new_run, open_run

CFG = FedtuneConfig(rounds=2, clients=2, data=DataConfig(demo_examples=40))


def test_a_new_run_saves_the_resolved_config_and_the_partition_summary(tmp_path):
    cfg, run, summary = new_run(CFG, tmp_path / "run")
    assert run.config() == cfg and cfg.data.labels and cfg.out == str(tmp_path / "run")
    assert (run.path / SUMMARY_FILE).is_file() and len(summary["clients"]) == 2


def test_open_run_continues_the_same_config_with_more_rounds(tmp_path):
    first, _ = open_run(CFG, tmp_path / "run")
    again, run = open_run(CFG.with_overrides({"rounds": 5}), tmp_path / "run")
    assert again.rounds == 5 and again.with_overrides({"rounds": 2}) == first
    assert run.config().rounds == 5


def test_open_run_refuses_to_continue_a_run_under_another_config(tmp_path):
    """`flwr run` used to resume whatever run was in `out`, whatever the config asked."""
    open_run(CFG, tmp_path / "run")
    saved = (tmp_path / "run" / "config.toml").read_text()
    # a σ given by hand replaces the private recipe's target ε, and its learning rate follows σ (fedtune/recipe.py)
    with pytest.raises(ConfigError, match=r"another config \(dp.noise_multiplier, dp.target_epsilon, lora.r, "
                                          r"train.learning_rate differ\)"):
        open_run(CFG.with_overrides({"lora.r": 8, "dp.noise_multiplier": 2.0}), tmp_path / "run")
    assert (tmp_path / "run" / "config.toml").read_text() == saved


def test_a_causal_lm_run_has_no_label_list_and_its_summary_counts_conversations(tmp_path):
    cfg = CFG.with_overrides({"model.task": "causal-lm"})
    cfg, run, summary = new_run(cfg, tmp_path / "run")
    assert cfg.data.labels == () and summary["examples"] == 40
    assert run.config().model == ModelConfig(task="causal-lm")
