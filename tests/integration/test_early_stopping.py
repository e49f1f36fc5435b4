"""Early stopping without DP, end to end: a run whose clients' validation loss stops improving ends
after `early_stopping_patience` rounds without a better one (and, with `cooldown_rounds`, that many
rounds of a falling learning rate), says so, keeps that round's adapter, and a resume of it has
nothing left to do."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_simulate import fedtune

pytestmark = pytest.mark.integration


def test_a_run_whose_validation_loss_stays_flat_stops_after_the_patience(tmp_path):
    out = tmp_path / "run"
    # SGD at 1e-30 leaves every weight as it was in float32, so each round's client validation loss
    # equals round 1's exactly: round 1 stays the best, and two rounds without a better one end the run.
    result = fedtune("simulate", "--no-dp", "--clients", "2", "--rounds", "6", "--examples", "120",
                     "--optimizer", "sgd", "--learning-rate", "1e-30", "--early-stopping-patience", "2",
                     "--cooldown-rounds", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stopping early after round 3: the clients' validation loss has not improved on round 1's for 2 " \
           "rounds" in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["stopped_early"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[1]["client_eval_loss"] == rows[2]["client_eval_loss"] == rows[3]["client_eval_loss"]

    resumed = fedtune("simulate", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stopped early after round 3; nothing to resume" in resumed.stdout + resumed.stderr


def test_with_a_cooldown_the_rate_falls_to_zero_before_the_stop_and_a_useless_one_is_rejected(tmp_path):
    out = tmp_path / "run"
    result = fedtune("simulate", "--no-dp", "--clients", "2", "--rounds", "8", "--examples", "120",
                     "--optimizer", "sgd", "--learning-rate", "1e-30", "--early-stopping-patience", "2",
                     "--cooldown-rounds", "2", "--lr-schedule", "constant", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join((result.stdout + result.stderr).split())
    assert "After round 3 the clients' validation loss has not improved on round 1's for 2 rounds" in said
    assert "Stopping early after round 5: by round 3" in said
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row["learning_rate"] / 1e-30 for row in rows[1:]] == pytest.approx([1, 1, 1, 2 / 3, 1 / 3])
    # the cooldown left the loss where round 3 had it (not lower): round 3's adapter is released
    assert "not below round 3's" in said and "releases round 3's adapter" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["adapter_round"] == 3
    assert summary["final_eval_accuracy"] == rows[3]["eval_accuracy"]
    resumed = fedtune("simulate", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stopped early after round 5; nothing to resume" in resumed.stdout + resumed.stderr
