"""A client's privacy history and the ε it implies, using Opacus' accountants.

The history is Opacus' own accountant state: a list of (noise_multiplier, sample_rate,
steps) runs. It is what a client persists between rounds, so ε is cumulative over every
local step the client has ever run, and rounds it sits out add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

History = list[tuple[float, float, int]]

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


def make_accountant(kind: str, history: Sequence[Sequence[float]] = ()) -> IAccountant:
    """An Opacus accountant of `kind` that has already seen `history`."""
    accountant = ACCOUNTANTS[kind]()
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
    return float(make_accountant(kind, list(history)).get_epsilon(delta=delta))


def other(kind: str) -> str:
    return "rdp" if kind == "prv" else "prv"
