"""`fedtune audit` end to end on tiny federations: memorised canaries without DP give a clearly positive
ε lower bound; with strong DP-SGD the bound stays at or below the run's theoretical ε."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_simulate import fedtune, fedtune_here

pytestmark = pytest.mark.integration

# Two clients, two rounds, 15 short demo texts and 60 canaries: the canaries are most of the data, so
# that a few local epochs are enough to memorise the members when nothing stops it.
TINY = """
rounds = 2
clients = 2
[model]
max_length = 20
[lora]
r = 4
[train]
batch_size = 8
learning_rate = 0.005
local_epochs = 2
[data]
demo_examples = 20
test_fraction = 0.25
partition = "iid"
"""
REQUIRED = {"epsilon_lower_bound", "epsilon_theoretical", "delta", "canaries", "guesses", "correct", "auc",
            "tpr_at_fpr_0.01"}


def audited(tmp_path: Path, *args: str) -> tuple[Path, dict]:
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("audit", "--config", str(tmp_path / "tiny.toml"), "--canaries", "60", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out / "audit.json")
    assert "ε lower bound" in result.stderr
    assert "scores them" not in result.stderr  # simulate's hint to run the audit is not for this run
    record = json.loads((out / "audit.json").read_text())
    assert REQUIRED <= set(record) and record["canaries"] == 60
    assert 0 <= record["correct"] <= record["guesses"] <= 60
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["audit"]["epsilon_lower_bound"] == record["epsilon_lower_bound"]
    assert "## Empirical privacy audit" in (out / "privacy_report.md").read_text()
    return out, record


def test_memorised_canaries_without_dp_give_a_clearly_positive_bound(tmp_path):
    out, record = audited(tmp_path, "--no-dp", "--canary-repeats", "8")
    assert record["epsilon_theoretical"] == "inf" and record["consistent"]
    assert record["epsilon_lower_bound"] > 0.8
    assert record["auc"] > 0.9
    # the member canaries reached their clients: 8 copies each on top of the demo texts
    summary = json.loads((out / "partition_summary.json").read_text())
    members = sum(record["canary_members"])
    assert sum(c["train"] for c in summary["clients"]) == 15 - sum(c["val"] for c in summary["clients"]) + 8 * members
    server = server_view(out)  # the same run, seen as the server saw it: every update of every round
    assert server["epsilon_lower_bound"] > 0.8 and server["auc"] > 0.9 and server["consistent"]


def test_strong_dp_keeps_the_bound_at_or_below_the_theoretical_epsilon(tmp_path):
    out, record = audited(tmp_path, "--noise-multiplier", "3")
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    spent = max(e["epsilon"] for entries in ledger["clients"].values() for e in entries)
    assert record["epsilon_theoretical"] == pytest.approx(spent) and 0 < spent < 10
    assert record["epsilon_lower_bound"] <= record["epsilon_theoretical"]
    assert record["consistent"] and record["delta"] == 1e-5
    server = server_view(out)
    assert server["epsilon_lower_bound"] <= server["epsilon_theoretical"] == record["epsilon_theoretical"]


def server_view(run: Path) -> dict:
    """`fedtune audit --resume RUN --vantage server` on a finished audited run (no federation to start)."""
    assert sorted(p.name for p in (run / "observed_updates").iterdir()) == ["round_0001.pt", "round_0002.pt"]
    code, _, stderr = fedtune_here("audit", "--resume", str(run), "--vantage", "server")
    assert code == 0, stderr[-3000:]
    assert "Privacy audit of every update the server received" in stderr
    record = json.loads((run / "audit.json").read_text())
    assert record["vantage"] == "server" and len(record["canary_scores"]) == 60
    return record


def test_canary_institutions_audit_client_level_dp(tmp_path):
    """`--canary-clients`: the audit of client-level DP. Added canary institutions push the final
    adapter along their directions, the report gives the bound and Andrew et al.'s estimate beside the
    client-level ε, and the server-vantage audit, which scores records, is refused for them."""
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    args = ("--config", str(tmp_path / "tiny.toml"), "--canary-clients", "100", "--client-dp", "fixed",
            "--client-noise-multiplier", "1", "--no-dp", "--delta", "1e-3")
    code, _, stderr = fedtune_here("audit", *args, "--vantage", "server", "--out", str(out))
    assert code == 2 and "--canary-clients" in stderr and not out.exists()
    result = fedtune("audit", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "canary institutions" in result.stderr and "ε estimate" in result.stderr
    record = json.loads((out / "audit.json").read_text())
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert record["unit"] == "client" and record["canaries"] == 100 and record["consistent"]
    assert record["epsilon_theoretical"] == pytest.approx(ledger["client_level"]["epsilon"])
    scores, members = record["canary_scores"], record["canary_members"]
    inside = [s for s, m in zip(scores, members, strict=True) if m]
    outside = [s for s, m in zip(scores, members, strict=True) if not m]
    # q = 1, 2 rounds at z = 1: each added canary moved the adapter by 2·C/m along its direction, √2 noise stds
    assert sum(inside) / len(inside) > sum(outside) / len(outside) and record["auc"] > 0.7
    low, high = record["epsilon_estimate_interval"]
    assert 0 < low <= record["epsilon_estimate"] <= high
    assert "canary institutions" in (out / "privacy_report.md").read_text()


def test_gradient_canaries_give_the_server_vantage_its_full_power(tmp_path):
    """`--vantage server` plants gradient canaries by default (each one's gradient 10·C along a random
    direction). Without DP every member's update moves along its direction, so the audit reaches the
    largest bound its canaries can certify, from the server's view and from the final adapter's."""
    (tmp_path / "tiny.toml").write_text(TINY.replace("local_epochs = 2", "local_epochs = 1"))
    out = tmp_path / "run"
    result = fedtune("audit", "--config", str(tmp_path / "tiny.toml"), "--canaries", "60", "--no-dp",
                     "--vantage", "server", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "audit.json").read_text())
    assert record["canary_kind"] == "gradient" and "−u_j" in record["score"]
    assert "each was a gradient canary" in (out / "privacy_report.md").read_text()
    assert record["auc"] > 0.99 and record["epsilon_lower_bound"] == pytest.approx(
        record["epsilon_largest_certifiable"]), "every guess right"
    code, _, stderr = fedtune_here("audit", "--resume", str(out), "--vantage", "final")
    assert code == 0, stderr[-3000:]
    final = json.loads((out / "audit.json").read_text())
    assert final["vantage"] == "final" and final["canary_kind"] == "gradient" and final["auc"] > 0.95


def test_gradient_canaries_under_dp_stay_at_or_below_the_theoretical_epsilon(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("audit", "--config", str(tmp_path / "tiny.toml"), "--canaries", "60", "--noise-multiplier", "3",
                     "--vantage", "server", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "audit.json").read_text())
    assert record["canary_kind"] == "gradient" and record["consistent"]
    assert record["epsilon_lower_bound"] <= record["epsilon_theoretical"] < 10
