"""Canary institutions (dp.canary_clients), the audit of client-level DP: each member canary adds
exactly C·c_j to the clipped sum under the DP wrapper's noise, joins by the same coin flips as any
institution, and the audit's scores measure the mechanism that was run: Andrew et al.'s estimate
lands on the Gaussian mechanism's exact ε, and a wrapper that adds a tenth of its noise is exposed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis.gdp import eps_from_mu

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.privacy.audit import audit, gaussian_estimate
from fedtune.privacy.client_level import client_level_epsilon
from fedtune.strategies.build import build_strategy
from fedtune.strategies.canary_clients import CanaryClients, flat_order
from fedtune.strategies.client_dp import canary_clients
from tests.strategies.test_client_dp import configure, delta_of, reply

pytestmark = pytest.mark.usefixtures("flower_run")

WIDE = 20_000  # weights in the test adapter: random directions are then all but orthogonal (cosine ~ 0.007)


def cfg_for(k: int, z: float = 1.0, c: float = 1.0, clients: int = 4, fraction: float = 1.0,
            clipping: str = "fixed", side: str = "server") -> FedtuneConfig:
    return FedtuneConfig().with_overrides({
        "clients": clients, "strategy.fraction_train": fraction, "dp.client_dp": clipping, "dp.client_dp_side": side,
        "dp.client_noise_multiplier": z, "dp.client_clipping_norm": c, "dp.canary_clients": k, "dp.delta": 1e-5})


def wide_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)  # names out of sorted order: the canaries' layout must not depend on it
    return {"lora_B": rng.normal(size=(4, 5)).astype(np.float32), "head": rng.normal(size=WIDE).astype(np.float32)}


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    names = list(arrays)
    return np.concatenate([arrays[names[i]].ravel() for i in flat_order(names)]).astype(np.float64)


def test_canary_clients_need_client_level_dp_and_exclude_canary_records():
    with pytest.raises(ConfigError, match="dp.canary_clients.*dp.client_dp"):
        FedtuneConfig().with_overrides({"dp.canary_clients": 10})
    with pytest.raises(ConfigError, match="one unit at a time"):
        FedtuneConfig().with_overrides({"dp.canary_clients": 10, "dp.client_dp": "fixed", "dp.delta": 1e-3,
                                        "data.canaries": 10})
    assert canary_clients(cfg_for(0)) is None


def small_update(seed: int) -> dict[str, np.ndarray]:
    """An institution's own update, of norm 1e-3: below C, so neither side's clipping changes it."""
    rng = np.random.default_rng(seed)
    u = {"lora_B": rng.normal(size=(4, 5)), "head": rng.normal(size=WIDE)}
    scale = 1e-3 / np.linalg.norm(flat(u))
    return {n: a * scale for n, a in u.items()}


@pytest.mark.parametrize("side", ["server", "client"])
def test_each_sampled_member_adds_exactly_its_direction_at_the_clipping_norm(side):
    g = wide_arrays()
    cfg = cfg_for(30, z=0.0, c=0.7, side=side)
    strategy = build_strategy(cfg)
    configure(strategy, g)
    updates = [small_update(i) for i in range(2)]
    arrays, _ = strategy.aggregate_train(1, [reply(g, u) for u in updates])
    canaries = canary_clients(cfg)
    cohort = canaries.cohort(1)
    assert cohort and all(canaries.members[j] for j in cohort)  # q = 1: every member, no non-member
    assert len(cohort) == sum(canaries.members)
    expected = (sum(flat(u) for u in updates) + sum(0.7 * canaries.direction(j, WIDE + 20) for j in cohort)) / 4
    np.testing.assert_allclose(flat(delta_of(arrays, g)), expected, atol=3e-6)


def test_membership_is_a_fair_coin_and_members_train_with_the_institutions_rate():
    canaries = CanaryClients(4000, seed=7, sample_rate=0.25)
    assert sum(canaries.members) == pytest.approx(2000, abs=4 * math.sqrt(1000))
    assert canaries.members == CanaryClients(4000, seed=7, sample_rate=0.25).members  # the auditor rebuilds it
    assert canaries.members != CanaryClients(4000, seed=8, sample_rate=0.25).members
    rounds = [set(canaries.cohort(r)) for r in range(1, 41)]
    per_round = [len(r) for r in rounds]
    assert np.mean(per_round) == pytest.approx(500, rel=0.05)  # members x q
    assert rounds[0] != rounds[1] and set().union(*rounds) <= {j for j, m in enumerate(canaries.members) if m}
    c = canaries.direction(3, 1000)
    assert np.linalg.norm(c) == pytest.approx(1.0) and abs(c @ canaries.direction(4, 1000)) < 0.15


def run_rounds(cfg: FedtuneConfig, rounds: int) -> np.ndarray:
    """θ_T − θ_0 after `rounds` releases of the real client-level DP stack over 4 institutions with
    tiny updates of their own, flattened in the canaries' layout."""
    np.random.seed(11)  # Flower's noise comes from numpy's global generator
    g = wide_arrays()
    strategy = build_strategy(cfg)
    current = g
    for round_ in range(1, rounds + 1):
        configure(strategy, current)
        arrays, _ = strategy.aggregate_train(round_, [reply(current, small_update(i)) for i in range(4)])
        current = {n: t.numpy() for n, t in arrays.to_torch_state_dict().items()}
    return flat(current) - flat(g)


def scores_of(cfg: FedtuneConfig, change: np.ndarray) -> tuple[tuple[bool, ...], list[float]]:
    canaries = canary_clients(cfg)
    norm = np.linalg.norm(change)
    return canaries.members, [float(c @ change) / norm for c in canaries.directions(change.size)]


def test_the_estimate_lands_on_the_gaussian_mechanisms_exact_epsilon():
    """q = 1, T rounds, multiplier z: a canary's total push along c_j is T·C/m against noise of std
    √T·z·C/m, so the released model is μ-GDP in it with μ = √T/z, and Andrew et al.'s estimate should
    sit at that ε (up to the sampling error of 400 canaries), under the RDP ε the ledger reports."""
    z, rounds = 2.0, 4
    cfg = cfg_for(400, z=z)
    members, scores = scores_of(cfg, run_rounds(cfg, rounds))
    exact = eps_from_mu(mu=math.sqrt(rounds) / z, delta=1e-5)  # 4.38
    estimate = gaussian_estimate(scores, members, 1e-5)
    assert estimate.mu == pytest.approx(math.sqrt(rounds) / z, abs=0.25)
    assert estimate.epsilon == pytest.approx(exact, abs=1.2)
    theoretical = client_level_epsilon(z, 1.0, rounds, 1e-5)
    assert exact < theoretical  # RDP is an upper bound, looser than the exact Gaussian ε
    assert audit(scores, members, 1e-5).epsilon_lower_bound <= theoretical


def test_a_tenth_of_the_noise_is_exposed_by_the_estimate(monkeypatch):
    """The mutation the audit exists for: the wrapper claims z but adds z/10. The estimate then lands
    far above the ε that the ledger reports (the one-run bound, capped near 3 by 400 canaries at
    δ = 1e-5, is above it too once the claimed ε is small)."""
    import flwr.serverapp.strategy.dp_fixed_clipping as fixed

    real = fixed.add_gaussian_noise_inplace
    monkeypatch.setattr(fixed, "add_gaussian_noise_inplace", lambda arrays, std: real(arrays, std / 10))
    z, rounds = 8.0, 1
    cfg = cfg_for(400, z=z)
    members, scores = scores_of(cfg, run_rounds(cfg, rounds))
    theoretical = client_level_epsilon(z, 1.0, rounds, 1e-5)  # about 0.6
    assert gaussian_estimate(scores, members, 1e-5).epsilon > 3 * theoretical
    assert audit(scores, members, 1e-5).epsilon_lower_bound > theoretical
