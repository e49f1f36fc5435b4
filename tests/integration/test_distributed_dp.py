"""Distributed DP end to end: four institutions each add half the noise (t = 4), SecAgg+
reveals only the sum, the federation learns, the ledger says under which assumption its ε holds, and
privacy-verify and the report agree."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_lora_aggregation import rows_of
from tests.integration.test_simulate import fedtune

pytestmark = pytest.mark.integration


def test_four_institutions_each_adding_half_the_noise_learn_under_the_stated_assumption(tmp_path):
    out = tmp_path / "run"
    result = fedtune("simulate", "--clients", "4", "--rounds", "2", "--examples", "300", "--secagg",
                     "--distributed-min-honest", "4", "--head-init", "random",  # two rounds show learning
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(out)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"], "the federation learns from the sum of the shares"
    entries = [e for es in json.loads((out / "privacy_ledger.json").read_text())["clients"].values() for e in es]
    assert len(entries) == 8 and all(e["distributed_min_honest"] == 4 and e["steps"] == 1 for e in entries)
    assert max(e["epsilon"] for e in entries) == pytest.approx(8.0, rel=0.01)
    assert fedtune("privacy-verify", str(out)).returncode == 0
    assert fedtune("privacy-report", str(out)).returncode == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["distributed"]["min_honest"] == 4 and report["distributed"]["epsilon_own_share"] > 8.0
    assert report["run_finished"] is True
    text = (out / "privacy_report.md").read_text()
    assert "has not finished" not in text
    assert "at least 4 honest institutions a round" in text
    assert "Under distributed DP each client added only 1/4 of that noise's variance" in text
    assert "Nothing is rounded after the noise, so this holds against the coordinator too" in text
    assert "Skellam accountant" in text
    assert not (out / "observed_updates").exists(), "under SecAgg+ the server keeps no institution's update"


def test_rounds_of_one_sampled_step_each_add_a_share_and_verify(tmp_path):
    """train.sample_rate under distributed DP: every institution takes one Poisson step at q a round, so
    the sum is one DP-SGD step at q over all their records. The ledger records q and one step, the
    target ε is spent over the planned rounds, and privacy-verify recomputes it."""
    out = tmp_path / "run"
    result = fedtune("simulate", "--clients", "4", "--rounds", "3", "--examples", "300", "--secagg",
                     "--distributed-min-honest", "4", "--sample-rate", "0.5", "--head-init", "random",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(out)
    # the sum of sampled steps moves the model (whether 3 noisy rounds of 150 sampled records lower the loss is
    # chance: CI once saw 1.37 -> 1.41; learning under sampled rounds is measured in bench/utility.py)
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"], "the federation applies the sum of sampled steps"
    entries = [e for es in json.loads((out / "privacy_ledger.json").read_text())["clients"].values() for e in es]
    assert len(entries) == 12
    assert all((e["sample_rate"], e["steps"], e["distributed_min_honest"]) == (0.5, 1, 4) for e in entries)
    assert max(e["epsilon"] for e in entries) == pytest.approx(8.0, rel=0.01)
    assert len({e["noise_multiplier"] for e in entries}) == 1, "one σ for every share"
    assert fedtune("privacy-verify", str(out)).returncode == 0
    assert fedtune("privacy-report", str(out)).returncode == 0
    assert json.loads((out / "privacy_report.json").read_text())["distributed"]["sample_rate"] == 0.5
    assert "one step on a Poisson sample of its records at rate q = 0.5" in (out / "privacy_report.md").read_text()
