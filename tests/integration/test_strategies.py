"""Server optimizers, robust aggregation and the update-norm bound end to end: tiny federations
through Flower's Simulation Engine, driven by the `fedtune` command, on the tiny classifier (they
check the server's arithmetic and the ledger, not learning)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedtune.config import StrategyConfig
from tests.integration.test_simulate import TINY, fedtune

pytestmark = pytest.mark.integration
ONE_ROUND = TINY.replace("rounds = 2", "rounds = 1").replace("local_epochs = 2", "local_epochs = 1")


def _checkpoint(run, round_: int) -> dict:
    return torch.load(run / "checkpoints" / f"round_{round_:04d}.pt", weights_only=True)


def test_fedadam_with_robust_median_runs_and_resumes_with_its_moments(tmp_path, tiny_classifier):
    (tmp_path / "tiny.toml").write_text(ONE_ROUND)
    run = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(run),
                     "--strategy", "fedadam", "--robust", "median", "--model", str(tiny_classifier))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fedadam with robust median" in result.stderr
    result = fedtune("simulate", "--resume", str(run), "--rounds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num_clients"], r["num_failed"]) for r in rows] == [(0, 0, 0), (1, 3, 0), (2, 3, 0)]

    first, second = _checkpoint(run, 1), _checkpoint(run, 2)
    names = list(second["arrays"])
    assert set(second["optimizer_state"]) == {f"{m}/{n}" for m in ("m_t", "v_t") for n in names}
    # The resumed round continued round 1's moments: m2 = b1 m1 + (1 - b1) Δ2 gives Δ2, and then
    # v2 = b2 v1 + (1 - b2) Δ2² must hold, which it does not if m and v restarted from zero. The step
    # is Flower's FedAdam one: x2 = x1 + η2 m2 / (√v2 + τ), η2 = η √(1 - b2³) / (1 - b1³).
    s = StrategyConfig(name="fedadam")  # the run's defaults
    b1, b2, tau = s.beta_1, s.beta_2, s.tau
    eta2 = s.effective_server_learning_rate() * math.sqrt(1 - b2 ** 3) / (1 - b1 ** 3)
    for name in names:
        m1, v1 = (first["optimizer_state"][f"{m}/{name}"].double().numpy() for m in ("m_t", "v_t"))
        m2, v2 = (second["optimizer_state"][f"{m}/{name}"].double().numpy() for m in ("m_t", "v_t"))
        delta2 = (m2 - b1 * m1) / (1 - b1)
        np.testing.assert_allclose(v2, b2 * v1 + (1 - b2) * delta2 ** 2, rtol=1e-3, atol=1e-9)
        step = second["arrays"][name].double().numpy() - first["arrays"][name].double().numpy()
        np.testing.assert_allclose(step, eta2 * m2 / (np.sqrt(v2) + tau), rtol=1e-3, atol=5e-7)
        assert second["arrays"][name].dtype == torch.float32


def test_updates_above_the_norm_bound_are_rejected_with_the_reason_in_the_ledger(tmp_path, tiny_classifier):
    (tmp_path / "tiny.toml").write_text(ONE_ROUND)
    run = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(run),
                     "--max-update-norm", "1e-6", "--model", str(tiny_classifier))
    assert result.returncode == 2  # every update rejected: the round cannot aggregate
    assert "only 0 of the 3 sampled clients answered" in result.stderr
    assert "exceeds strategy.max_update_norm" in result.stderr
    ledger = json.loads((run / "privacy_ledger.json").read_text())["clients"]
    assert len(ledger) == 3
    for (entry,) in ledger.values():  # refused, but trained: the ε it spent is on record
        assert entry["status"] == "rejected" and entry["steps"] > 0 and entry["epsilon"] > 0
        assert entry["reason"].startswith("update rejected: update norm ")
