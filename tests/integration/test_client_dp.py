"""Client-level DP end to end: a tiny federation through Flower's Simulation Engine (on the tiny
classifier: these check the accounting and the secure sum, not learning)."""

from __future__ import annotations

import json

import pytest

from fedtune.privacy.client_level import client_level_epsilon
from tests.integration.test_simulate import TINY, fedtune

pytestmark = pytest.mark.integration


def ledger_of(out) -> dict:
    return json.loads((out / "privacy_ledger.json").read_text())


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_client_level_dp_run_finishes_and_the_ledger_accounts_it(tmp_path, tiny_classifier):
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out), "--client-dp", "fixed",
                     "--client-noise-multiplier", "0.8", "--client-clipping-norm", "0.5",
                     "--model", str(tiny_classifier))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ledger_of(out)["client_level"] == {
        "clipping": "fixed", "side": "server", "noise_multiplier": 0.8, "clipping_norm": 0.5, "sample_rate": 1.0,
        "rounds": 2, "delta": 1e-5, "epsilon": pytest.approx(client_level_epsilon(0.8, 1.0, 2, 1e-5)),
        "accountant": "rdp", "sampling": "every institution, every round"}
    assert {e["status"] for entries in ledger_of(out)["clients"].values() for e in entries} == {"trained"}
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["num_clients"] == 3
    verified = fedtune("privacy-verify", str(out))  # the account's figures are the config's
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_secagg_with_client_side_clipping_and_declining_clients(tmp_path, tiny_classifier):
    # After round 1 the clients have spent ε 10 to 13.5 (sample level); a budget of 15 lets only the
    # smallest spender train round 2, so the others take part in SecAgg+ with zero updates.
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out), "--secagg",
                     "--epsilon-budget", "15", "--client-dp", "fixed", "--client-dp-side", "client",
                     "--client-noise-multiplier", "0.5", "--client-clipping-norm", "1.0",
                     "--model", str(tiny_classifier))
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = ledger_of(out)
    statuses = [[e["status"] for e in entries] for entries in ledger["clients"].values()]
    assert all(s[0] == "trained" for s in statuses) and any(s[1] == "declined" for s in statuses)
    assert ledger["client_level"]["side"] == "client" and ledger["client_level"]["rounds"] == 2
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["num_declined"] >= 1 and rows[2]["num_failed"] == 0
    assert rows[2]["eval_loss"] != rows[1]["eval_loss"], "round 2's securely summed update reached the model"


def test_adaptive_client_side_clipping_under_secagg_runs_and_verifies(tmp_path, tiny_classifier):
    """Adaptive clipping with the clipping in each client's mod and only the sum through SecAgg+: the run
    finishes both rounds, the summed update reaches the model, and the account verifies."""
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out), "--secagg",
                     "--client-dp", "adaptive", "--client-dp-side", "client", "--client-noise-multiplier", "0.5",
                     "--model", str(tiny_classifier))
    assert result.returncode == 0, result.stderr[-3000:]
    account = ledger_of(out)["client_level"]
    assert (account["clipping"], account["side"], account["rounds"]) == ("adaptive", "client", 2)
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["num_failed"] == 0
    assert rows[2]["eval_loss"] != rows[1]["eval_loss"], "round 2's securely summed update reached the model"
    verified = fedtune("privacy-verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
