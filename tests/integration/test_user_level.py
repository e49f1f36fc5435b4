"""User-level DP end to end: `fedtune simulate --user-column patient_id --privacy-unit user` on notes
where some patients have many records; the ledger counts users, its ε is what an independent
accountant gives for q over users, and `privacy-verify` passes."""

from __future__ import annotations

import json
import math
import tomllib

import pytest

from fedtune.privacy.independent import independent_epsilon
from tests.data.test_users import write_notes
from tests.integration.test_simulate import fedtune

pytestmark = pytest.mark.integration

TINY = """
[lora]
r = 2
[model]
max_length = 24
[data]
test_fraction = 0.15
"""


def test_a_user_level_run_accounts_users_and_verifies(tmp_path):
    notes = write_notes(tmp_path / "notes.csv", users=90)
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--data", str(notes), "--user-column",
                     "patient_id", "--privacy-unit", "user", "--clients", "4", "--rounds", "2", "--batch-size", "8",
                     "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "users: 90 in column `patient_id`" in result.stderr

    summary = json.loads((out / "partition_summary.json").read_text())
    users = {f"client-{cid:04d}": row["train_users"] for cid, row in enumerate(summary["clients"])}
    assert all(row["train_users"] < row["train"] for row in summary["clients"])  # some patients have many notes
    cfg = tomllib.loads((out / "config.toml").read_text())
    batch, sigma = cfg["train"]["batch_size"], None
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["unit"] == "user" and set(ledger["clients"]) == set(users)
    for name, entries in ledger["clients"].items():
        q = 1 / math.ceil(users[name] / batch)  # from the data's user count, not from what the client says
        history = []
        for entry in entries:
            assert entry["num_examples"] == users[name] and entry["sample_rate"] == pytest.approx(q)
            sigma = entry["noise_multiplier"]
            history.append((sigma, q, entry["steps"]))
            assert entry["epsilon"] == pytest.approx(independent_epsilon("prv", history, cfg["dp"]["delta"]), rel=0.02)
        assert entries[-1]["epsilon"] <= cfg["dp"]["target_epsilon"] * 1.001

    verified = fedtune("privacy-verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = fedtune("privacy-report", str(out))
    assert report.returncode == 0, report.stderr[-2000:]
    text = (out / "privacy_report.md").read_text()
    assert "**Unit of privacy**: one person" in text and "with all of their records" in text
    assert json.loads((out / "privacy_report.json").read_text())["neighbouring_relation"].startswith(
        "add/remove one user of one institution with all of that user's records")


def test_the_audit_plants_canary_users_and_bounds_the_user_level_epsilon(tmp_path):
    notes = write_notes(tmp_path / "notes.csv", users=40)
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "audit"
    result = fedtune("audit", "--config", str(tmp_path / "tiny.toml"), "--data", str(notes), "--user-column",
                     "patient_id", "--privacy-unit", "user", "--canaries", "16", "--canary-repeats", "3",
                     "--clients", "2", "--rounds", "1", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["unit"] == "user" and audit["canary_repeats"] == 3 and audit["consistent"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    summary = json.loads((out / "partition_summary.json").read_text())
    members = sum(audit["canary_members"])
    planted = sum(entries[-1]["num_examples"] for entries in ledger["clients"].values())
    assert planted == sum(row["train_users"] for row in summary["clients"])
    assert summary["users"] == 40 + members  # each member canary is one more user, its 3 copies together
    assert "canary users (in / out)" in result.stderr
