"""The ε of a history: fedtune's cached RDP arithmetic gives Opacus' RDP and PRV accountants' ε, to the bit."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.privacy.accountant import epsilon

HISTORIES = [
    [(1.2, 0.25, 120)],
    [(0.9, 1.0, 30)],
    [(1.5, 0.25, 3), (1.5, 0.5, 7), (0.8, 1.0, 2)],
    [(3.29, 1.0, 1), (3.29, 1.0, 29)],
    [(0.7, 0.01, 5000), (2.0, 0.125, 8)],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_epsilon_is_opacus_rdp_accountant_s_exactly(history, delta):
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert epsilon("rdp", history, delta) == float(opacus.get_epsilon(delta=delta))


def test_each_round_s_longer_history_is_composed_afresh():
    """The cache holds one step's RDP, never an ε: 120 steps cost more than 119."""
    shorter, longer = epsilon("rdp", [(1.2, 0.25, 119)], 1e-5), epsilon("rdp", [(1.2, 0.25, 120)], 1e-5)
    assert shorter < longer


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_epsilon_is_opacus_prv_accountant_s_exactly(history):
    """Only the PRV domain's RDP bound is computed from the cache; the domain, and so ε, is Opacus'."""
    opacus = PRVAccountant()
    opacus.history = list(history)
    assert epsilon("prv", history, 1e-5) == float(opacus.get_epsilon(delta=1e-5))


def test_a_history_whose_prv_grid_is_too_large_is_accounted_with_rdp_by_a_rule_every_machine_shares():
    """10^4 full-batch steps at σ = 1 asked PRV for ~10^8 points, more than 24 GB: the process was killed.
    The switch to RDP (an upper bound of the same mechanism) is decided by the grid's size, before any of
    it is allocated, so a client and the server recomputing its ε reach the same figure."""
    from fedtune.privacy.accountant import MAX_PRV_POINTS

    long = [(1.0, 1.0, 10**4)]
    assert epsilon("prv", long, 1e-5) == epsilon("rdp", long, 1e-5)
    short = [(1.0, 1.0, 30)]
    assert epsilon("prv", short, 1e-5) < epsilon("rdp", short, 1e-5)
    assert MAX_PRV_POINTS <= 2 * 10**7  # about 160 MB a float64 array: PRV's few arrays fit anywhere


def test_a_history_of_many_sigma_segments_is_accounted_with_rdp_so_no_node_can_stall_the_server(monkeypatch):
    """A hostile node's review: PRV composes one distribution per (σ, q) segment, so a node alternating its σ
    every round made the server's recomputation of its ε take minutes a round. Past MAX_PRV_SEGMENTS (after
    joining consecutive equal segments, as a per-round history of one σ is) ε is RDP's, an upper bound."""
    import fedtune.privacy.accountant as accountant

    alternating = [(1.0 + 0.1 * (i % 2), 0.25, 4) for i in range(200)]  # PRV itself: about a minute on 2 cores
    assert epsilon("prv", alternating, 1e-5) == epsilon("rdp", alternating, 1e-5)
    monkeypatch.setattr(accountant, "MAX_PRV_SEGMENTS", 2)  # the boundary, where PRV stays cheap to compute
    one_sigma = [(1.2, 0.25, 4)] * 3  # 3 rounds of one σ: one segment, still PRV's
    assert epsilon("prv", one_sigma, 1e-5) < epsilon("rdp", one_sigma, 1e-5)
    at_cap, past_cap = [(1.3, 0.25, 4), (1.4, 0.25, 4)], [(1.3, 0.25, 4), (1.4, 0.25, 4), (1.3, 0.25, 4)]
    assert epsilon("prv", at_cap, 1e-5) < epsilon("rdp", at_cap, 1e-5)
    assert epsilon("prv", past_cap, 1e-5) == epsilon("rdp", past_cap, 1e-5)
