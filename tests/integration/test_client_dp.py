"""Client-level DP end to end: a tiny federation through Flower's Simulation Engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedtune.privacy.client_level import client_level_epsilon

pytestmark = pytest.mark.integration

TINY = """
rounds = 2
clients = 3
[lora]
r = 4
[train]
batch_size = 16
learning_rate = 0.003
local_epochs = 2
[dp]
noise_multiplier = 0.6
[data]
demo_examples = 360
test_fraction = 0.25
"""


def fedtune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_client_level_dp_run_finishes_and_the_ledger_accounts_it(tmp_path):
    # client-side clipping: the wrapper's norm reaches the real ClientApp and its mod; with DP-SGD on
    clipping, side = "fixed", "client"
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out), "--client-dp", clipping,
                     "--client-dp-side", side, "--client-noise-multiplier", "0.8", "--client-clipping-norm", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    entry = ledger["client_level"]
    assert {key: entry[key] for key in ("clipping", "side", "sample_rate", "rounds", "delta", "accountant")} == {
        "clipping": clipping, "side": side, "sample_rate": 1.0, "rounds": 2, "delta": 1e-5, "accountant": "rdp"}
    assert entry["noise_multiplier"] == pytest.approx(0.8)
    assert entry["epsilon"] == pytest.approx(client_level_epsilon(0.8, 1.0, 2, 1e-5))
    assert entry["clipping_norm"] == 0.5
    assert "fixedclipping_mod: parameters are clipped" in result.stderr  # the clients did clip
    statuses = {e["status"] for entries in ledger["clients"].values() for e in entries}
    assert statuses == {"trained"}  # the mod let every client's reply through
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["num_clients"] == 3


def test_secagg_is_refused_until_it_exists(tmp_path):
    result = fedtune("simulate", "--out", str(tmp_path / "never"), "--secagg", timeout=120)
    assert result.returncode == 2 and "dp.secagg" in result.stderr and not (tmp_path / "never").exists()
