"""A client's privacy history and the ε it implies, using Opacus' accountants.

The history is Opacus' own accountant state: a list of (noise_multiplier, sample_rate,
steps) runs. It is what a client persists between rounds, so ε is cumulative over every
local step the client has ever run, and rounds it sits out add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

History = list[tuple[float, float, int]]


class CachedRdpPRVAccountant(PRVAccountant):
    """Opacus' PRVAccountant, whose discretisation domain is bounded with the cached RDP of _rdp_epsilon.

    Opacus sizes the PRV domain with two fresh RDPAccountant series (analysis/prv/domain.py::
    compute_safe_domain_size): most of a PRV ε's time at q < 1 (bench/accounting_cost.py). This computes
    the same bound, the same way, from one step's RDP per (σ, q), so the domain, and with it every ε, is
    Opacus' to the bit (tests/privacy/test_accountant.py). Only the domain is replaced: the PRVs, their
    discretisation and their composition are Opacus' own."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        total = sum(num_self_compositions)
        history = tuple((p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions,
                                                                                strict=True))
        bound = max(_rdp_epsilon(history, delta_error / 4),
                    *(_rdp_epsilon(((p.noise_multiplier, p.sample_rate, 1),), delta_error / (8 * total))
                      for p in prvs))
        size = max(bound, eps_error) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        if 2 * size / mesh > MAX_PRV_POINTS:
            raise PRVDomainTooLarge
        return Domain.create_aligned(-size, size, mesh)


# PRV's grid grows with the steps and the ε: 10^4 full-batch steps at σ = 1 ask for ~10^8 points and
# more than 24 GB (the process was killed, no MemoryError), while 28,000 steps at q = 1/32 take 1.2·10^7
# points and 11 s. Past this many, ε is RDP's: a looser upper bound of the same mechanism, chosen by the
# same arithmetic on every machine, so a client and the server recomputing its ε always agree.
MAX_PRV_POINTS = 2 * 10**7
# PRV composes one discretized distribution per (σ, q) segment of the history (consecutive equal ones
# joined, `merged`), at about 0.1-0.4 s each here: a node that alternates its σ every round would make the
# server's recomputation of its ε (server/spending.py) take minutes a round. A run keeps one σ per client
# (privacy/budget.py::client_dp reuses the first round's); an institution's state spans its runs, though,
# and one in more than this many runs of different σ is accounted by RDP from then on. Past this many, ε
# is RDP's, as past MAX_PRV_POINTS: an upper bound, the same on client and server.
MAX_PRV_SEGMENTS = 16


class PRVDomainTooLarge(Exception):
    """The history's PRV grid would exceed MAX_PRV_POINTS."""


def _skellam() -> type[IAccountant]:
    from fedtune.privacy.skellam import SkellamAccountant

    return SkellamAccountant


# "skellam": distributed DP's integer shares (privacy/skellam.py), always under distributed DP (DPConfig.accounting);
# it may also be chosen by hand for Gaussian noise, which it covers too (RDP at integer orders only: a little looser)
ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": CachedRdpPRVAccountant, "rdp": RDPAccountant}


def make_accountant(kind: str, history: Sequence[Sequence[float]] = ()) -> IAccountant:
    """An Opacus accountant of `kind` that has already seen `history`."""
    accountant = _skellam()() if kind == "skellam" else ACCOUNTANTS[kind]()
    if history:
        accountant.load_state_dict({"history": normalize(history), "mechanism": accountant.mechanism()})
    return accountant


def normalize(history: Sequence[Sequence[float]]) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in history]


def merged(history: Sequence[Sequence[float]]) -> History:
    """The same history with consecutive runs of equal (sigma, q) joined, as Opacus' accountants
    keep it: the same ε, and the same cache key as the client's own record."""
    out: History = []
    for sigma, q, steps in normalize(history):
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def epsilon(kind: str, history: Sequence[Sequence[float]], delta: float) -> float:
    """Cumulative ε at `delta`; 0 before any step, inf if any step ran without noise."""
    return _epsilon(kind, tuple(normalize(history)), delta)


@lru_cache(maxsize=4096)
def _epsilon(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # Cached because one ε costs 0.1-0.3 s of CPU (mostly Opacus' RDP series), about as much as
    # a small client's whole round, and the same history recurs: a client's budget projection is
    # its next report, and equal-sized clients share histories.
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    if kind == "rdp":
        return _rdp_epsilon(history, delta)
    if kind == "skellam":
        from fedtune.privacy import skellam

        return skellam.epsilon(history, delta)
    if len(merged(history)) > MAX_PRV_SEGMENTS:
        return _rdp_epsilon(history, delta)
    try:
        return float(make_accountant(kind, list(history)).get_epsilon(delta=delta))
    except PRVDomainTooLarge:
        return _rdp_epsilon(history, delta)  # an upper bound too, so the figure never understates what was spent


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """RDPAccountant.get_epsilon, the same arithmetic, from one step's RDP per (σ, q). Opacus computes the
    RDP of `steps` steps as steps times one step's (analysis/rdp.py::compute_rdp), but anew for every history.
    A run's histories differ only in their step counts, so every round cost a fresh series: at q < 1 about half
    of a client's busy time in a sampled round (py-spy, docs/benchmarks.md "Sixteenth session"). Equality with
    Opacus, to the bit: tests/privacy/test_accountant.py."""
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(_one_step_rdp(sigma, q) * steps for sigma, q, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=256)
def _one_step_rdp(sigma: float, q: float) -> np.ndarray:
    one = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    one.setflags(write=False)  # shared by every caller of the cache
    return one


def other(kind: str) -> str:
    """The accountant whose ε a client reports beside its own. Skellam steps have no second analysis
    here (PRV and Opacus' RDP are the Gaussian's): the same one."""
    return {"prv": "rdp", "rdp": "prv"}.get(kind, kind)
