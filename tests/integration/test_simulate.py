"""Tiny federations through Flower's Simulation Engine, driven by the `fedtune` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.privacy.independent import independent_epsilon

pytestmark = pytest.mark.integration

TINY = """
rounds = 2
clients = 3
[model]
head_init = "random"  # a head that starts from the label names leaves two rounds of DP little to show

[lora]
r = 4
[train]
batch_size = 16
learning_rate = 0.003
lr_schedule = "linear"
local_epochs = 2
[dp]
noise_multiplier = 0.6
[data]
demo_examples = 360
test_fraction = 0.25
"""


def history_from_ledger(entries: list[dict]) -> list[tuple[float, float, int]]:
    """The (sigma, q, steps) runs a client's ledger entries describe (rounds it took steps in)."""
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e.get("steps")]


def fedtune(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def fedtune_here(*args: str):
    """`fedtune ...` in this process (typer's CliRunner): for a command that starts no federation,
    without a fresh interpreter's seconds of imports. Returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("sim")
    (base / "tiny.toml").write_text(TINY)
    out = base / "run"
    result = fedtune("simulate", "--config", str(base / "tiny.toml"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_every_record(finished_run):
    for name in ("config.toml", "metrics.jsonl", "privacy_ledger.json", "summary.json", "adapter"):
        assert (finished_run / name).exists(), name
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == [
        "round_0000.pt", "round_0001.pt", "round_0002.pt"]
    rows = _rows(finished_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    required = {"round", "eval_accuracy", "eval_loss", "train_loss", "epsilon_max", "num_clients",
                "bytes_up", "bytes_down"}
    assert all(required <= set(r) for r in rows)
    assert rows[-1]["num_clients"] == 3
    assert [r["learning_rate"] for r in rows[1:]] == pytest.approx([0.003, 0.0015])  # linear decay
    summary = json.loads((finished_run / "summary.json").read_text())
    assert 0 <= summary["warm_up_wait_s"] < summary["wall_time_s"]
    assert summary["warm_up_failed"] == 0  # every worker loaded the model before round 1


def test_federation_learns(finished_run):
    rows = _rows(finished_run)
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_payload_is_adapter_sized_both_ways(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    rows = _rows(finished_run)
    assert summary["base_model_bytes"] > 80e6
    for row in rows[1:]:
        assert 0 < row["bytes_up"] <= 0.02 * summary["base_model_bytes"]
        assert 0 < row["bytes_down"] <= 0.02 * summary["base_model_bytes"]


def test_adapter_loads_with_peft_and_matches_the_last_evaluation(finished_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.data.demo import LABELS
    from fedtune.models.build import default_model_dir

    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=len(LABELS))
    model = PeftModel.from_pretrained(base, finished_run / "adapter")
    checkpoint = torch.load(finished_run / "checkpoints" / "round_0002.pt", weights_only=True)
    for name, tensor in checkpoint["arrays"].items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), tensor)


def test_ledger_records_every_client_every_round(finished_run):
    ledger = json.loads((finished_run / "privacy_ledger.json").read_text())
    assert ledger["accountant"] == "prv" and ledger["unit"] == "record"
    assert len(ledger["clients"]) == 3
    for entries in ledger["clients"].values():
        assert [e["round"] for e in entries] == [1, 2]
        assert all(e["status"] == "trained" and e["noise_multiplier"] == 0.6 for e in entries)
        assert 0 < entries[0]["epsilon"] < entries[1]["epsilon"]
        for r in (1, 2):  # the ledger's ε is what an independent accountant gets from its own σ, q, steps
            independent = independent_epsilon("prv", history_from_ledger(entries[:r]), entries[0]["delta"])
            assert entries[r - 1]["epsilon"] == pytest.approx(independent, rel=0.01)
    eps_max = max(e["epsilon"] for entries in ledger["clients"].values() for e in entries)
    assert _rows(finished_run)[-1]["epsilon_max"] == pytest.approx(eps_max)


def test_privacy_verify_passes_on_a_fresh_run_and_names_a_lowered_epsilon(finished_run, tmp_path):
    code, stdout, stderr = fedtune_here("privacy-verify", str(finished_run))
    assert code == 0, stdout + stderr
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    ledger = json.loads((copy / "privacy_ledger.json").read_text())
    name = sorted(ledger["clients"])[0]
    ledger["clients"][name][-1]["epsilon"] *= 0.8  # lowered by hand
    (copy / "privacy_ledger.json").write_text(json.dumps(ledger))
    code, stdout, _ = fedtune_here("privacy-verify", str(copy))
    assert code == 1
    assert stdout.startswith(f"{name} round 2: epsilon: expected ")


def test_resume_continues_without_resetting_epsilon(finished_run):
    before = json.loads((finished_run / "privacy_ledger.json").read_text())["clients"]
    result = fedtune("simulate", "--resume", str(finished_run), "--rounds", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(finished_run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    after = json.loads((finished_run / "privacy_ledger.json").read_text())["clients"]
    for name, entries in after.items():
        assert entries[:2] == before[name]  # nothing lost
        assert entries[2]["round"] == 3 and entries[2]["epsilon"] > entries[1]["epsilon"]


def test_budget_cap_stops_clients_and_the_run_still_finishes(tmp_path, tiny_classifier):
    # On the tiny classifier: what a client spends depends on its data, σ and the batch size, not the model.
    (tmp_path / "tiny.toml").write_text(TINY.replace("rounds = 2", "rounds = 3"))
    out = tmp_path / "capped"
    budget = 8.0  # one round fits (a budget no round fits is refused before the run), three do not
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out),
                     "--epsilon-budget", str(budget), "--noise-multiplier", "0.8", "--model", str(tiny_classifier))
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = json.loads((out / "privacy_ledger.json").read_text())["clients"]
    declined_somewhere = False
    for entries in ledger.values():
        statuses = [e["status"] for e in entries]
        first_decline = statuses.index("declined") if "declined" in statuses else len(statuses)
        assert set(statuses[first_decline:]) <= {"declined"}, "a declined client never trains again"
        declined_somewhere |= first_decline < len(statuses)
        assert all(e["epsilon"] <= budget for e in entries)
        spent = [e["epsilon"] for e in entries[first_decline - 1:]] if first_decline else []
        assert len(set(spent)) <= 1, "declining costs nothing"
        if first_decline < len(statuses):  # it stopped at the right round: one more would have overspent
            trained = history_from_ledger(entries[:first_decline])
            one_more = [*trained, trained[-1]] if trained else []
            # (the client decided with Opacus' PRV, which sits up to ~0.5% above the independent PLD)
            assert not trained or independent_epsilon("prv", one_more, 1e-5) > budget * 0.99
    assert declined_somewhere
    reasons = {e["reason"] for entries in ledger.values() for e in entries if e["status"] == "declined"}
    assert all(f"above its budget of {budget:g}" in reason for reason in reasons), reasons
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert sum(r["num_declined"] for r in rows) > 0 and rows[1]["num_clients"] > 0, "they trained, then declined"
    assert "declined=" in result.stderr, "the round line (on stderr; stdout names the run) says how many declined"
    assert all((f"No client trained in round {r['round']} " in result.stderr) == (r["num_clients"] == 0)
               for r in rows[1:])
