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
from tests.integration.test_simulate import fedtune, fedtune_here

pytestmark = pytest.mark.integration

TINY = """
[lora]
r = 2
[model]
max_length = 24
[data]
test_fraction = 0.15
"""


def test_a_user_level_run_accounts_users_verifies_and_audits_its_canary_users(tmp_path, tiny_classifier):
    """One federation: the issue's command (with 16 audit canaries, each a user of 3 copies, planted
    by the config file), then privacy-verify, the report, and the audit of that same run."""
    notes = write_notes(tmp_path / "notes.csv", users=90)
    (tmp_path / "tiny.toml").write_text(TINY + "canaries = 16\ncanary_repeats = 3\n")
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--data", str(notes), "--user-column",
                     "patient_id", "--privacy-unit", "user", "--clients", "4", "--rounds", "2", "--batch-size", "8",
                     "--model", str(tiny_classifier), "--out", str(out), timeout=900)  # accounting, not learning
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "partition_summary.json").read_text())
    users = {f"client-{cid:04d}": row["train_users"] for cid, row in enumerate(summary["clients"])}
    assert all(row["train_users"] < row["train"] for row in summary["clients"])  # some patients have many notes
    cfg = tomllib.loads((out / "config.toml").read_text())
    batch = cfg["train"]["batch_size"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["unit"] == "user" and set(ledger["clients"]) == set(users)
    for name, entries in ledger["clients"].items():
        q = 1 / math.ceil(users[name] / batch)  # from the data's user count, not from what the client says
        history = []
        for entry in entries:
            assert entry["num_examples"] == users[name] and entry["sample_rate"] == pytest.approx(q)
            history.append((entry["noise_multiplier"], q, entry["steps"]))
            assert entry["epsilon"] == pytest.approx(independent_epsilon("prv", history, cfg["dp"]["delta"]), rel=0.02)
        assert entries[-1]["epsilon"] <= cfg["dp"]["target_epsilon"] * 1.001

    code, stdout, stderr = fedtune_here("privacy-verify", str(out))
    assert code == 0, stdout + stderr
    audited = fedtune("audit", "--resume", str(out), timeout=600)  # scores the canaries; writes the report
    assert audited.returncode == 0, audited.stderr[-3000:] + audited.stdout[-2000:]
    audit = json.loads((out / "audit.json").read_text())
    assert audit["unit"] == "user" and audit["canary_repeats"] == 3 and audit["consistent"]
    members = sum(audit["canary_members"])
    assert summary["users"] == 90 + members and f"users: {90 + members} in column `patient_id`" in result.stderr
    assert "canary users (in / out)" in audited.stderr
    text = (out / "privacy_report.md").read_text()
    assert "**Unit of privacy**: one person" in text and "with all of their records" in text
    assert "a canary user with 3 records sharing one user id" in " ".join(text.split())
    assert "DP-SGD was off" not in text  # it was on: user-level DP allows repeated canaries
    assert json.loads((out / "privacy_report.json").read_text())["neighbouring_relation"].startswith(
        "add/remove one user of one institution with all of that user's records")
