"""ε by an implementation independent of Opacus: Google's dp-accounting, for the same mechanism.

fedtune's ledger and budgets use Opacus' accountants (privacy/accountant.py). An auditor who
checks the ledger (`fedtune privacy-verify`, privacy/verify.py) should not have to trust the same
code, so this module recomputes ε from the recorded (σ, q, steps) with dp-accounting instead: its
pessimistic PLD accountant, a near-exact ε of the mechanism (its discretization rounds up), whichever
accountant the run used. Every valid figure is at least the true ε: Opacus' PRV reports the upper
end of its error interval, and RDP's conversion is a looser upper bound. dp-accounting's own RDP is
no reference for RDP ledgers: at fractional Rényi orders it adds the series' terms as if all were
positive, a bound above Opacus' exact series (σ 1.1, q 0.25, α 1.8: 0.0737 where the integral is
0.0665), so a correct RDP ledger read as under-reported (a review: 7.997 against 8.154). The mechanism
is the same: each step a Poisson-subsampled Gaussian, under add/remove-one neighbours.

Distributed DP's Skellam steps (privacy/skellam.py) are bounded by the sampled Gaussian's RDP at integer
orders (the derivation is in that module and docs/privacy.md). This module recomputes that RDP with a
second implementation written apart from Opacus' (exact binomial coefficients and Python floats, one
step's vector cached per (σ, q), since a ledger repeats one (σ, q) in hundreds of entries), and converts
it to (ε, δ) with dp-accounting's own conversion. It checks the arithmetic, not the derivation;
tests/privacy/test_skellam.py checks the RDP against dp-accounting's accountant at the same orders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import dp_accounting as dpa
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

PLD_DISCRETIZATION = 1e-3  # dp-accounting's pessimistic PLD: ε is rounded up, never down


def _accountant() -> dpa.PrivacyAccountant:
    return PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION)


def epsilons_along(kind: str, runs: Iterable[Sequence[float]], deltas: Iterable[float]) -> list[float]:
    """The cumulative ε after each (sigma, q, steps) run of a history, composed incrementally, each
    at its own δ; inf from the first run without noise on."""
    if kind == "skellam":
        return _skellam_along(runs, deltas)
    accountant, out, unbounded, composed = _accountant(), [], False, False
    for (sigma, q, steps), delta in zip(runs, deltas, strict=True):
        if int(steps) > 0 and float(sigma) <= 0.0:
            unbounded = True
        elif int(steps) > 0:
            accountant.compose(dpa.PoissonSampledDpEvent(float(q), dpa.GaussianDpEvent(float(sigma))), int(steps))
            composed = True
        out.append(math.inf if unbounded else float(accountant.get_epsilon(delta)) if composed else 0.0)
    return out


def independent_epsilon(kind: str, history: Sequence[Sequence[float]], delta: float) -> float:
    """Cumulative ε of a whole history; 0 for none."""
    along = epsilons_along(kind, history, [delta] * len(history))
    return along[-1] if along else 0.0


def independent_client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int,
                                     delta: float) -> float:
    """Client-level DP (privacy/client_level.py): `rounds` Poisson-subsampled Gaussian releases, by
    dp-accounting's PLD accountant (fedtune accounts them with Opacus' RDP, an upper bound on it)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return independent_epsilon("prv", [(noise_multiplier, sample_rate, rounds)], delta)


SKELLAM_ORDERS = list(range(2, 129))


def _skellam_along(runs: Iterable[Sequence[float]], deltas: Iterable[float]) -> list[float]:
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    rdp, out, unbounded, composed = [0.0] * len(SKELLAM_ORDERS), [], False, False
    for (sigma, q, steps), delta in zip(runs, deltas, strict=True):
        if int(steps) > 0 and float(sigma) <= 0.0:
            unbounded = True
        elif int(steps) > 0:
            rdp = [r + int(steps) * x for r, x in zip(rdp, _one_step(float(sigma), float(q)), strict=True)]
            composed = True
        out.append(math.inf if unbounded else float(compute_epsilon(SKELLAM_ORDERS, rdp, delta)[0])
                   if composed else 0.0)
    return out


@lru_cache(maxsize=256)
def _one_step(sigma: float, q: float) -> tuple[float, ...]:
    # one (σ, q) recurs in every entry of a run: computed once, not once per ledger entry
    return tuple(_poisson_subsampled(a, q, sigma) for a in SKELLAM_ORDERS)


def _poisson_subsampled(alpha: int, q: float, sigma: float) -> float:
    """The sampled Gaussian's RDP at integer order α (Mironov, Talwar, Zhang 2019), the bound of a Skellam
    step (privacy/skellam.py): the log of Σ_j C(α,j)·(1 − q)^(α−j)·q^j·e^((j−1)·j/(2σ²)), summed from its
    largest term, over α − 1, with exact binomial coefficients and Python floats."""
    full = alpha / (2 * sigma * sigma)
    if q >= 1.0:
        return full
    terms = [((alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)),
             math.log(math.comb(alpha, 2)) + 2 * math.log(q) + (alpha - 2) * math.log1p(-q) + 1 / (sigma * sigma)]
    for j in range(3, alpha + 1):
        terms.append(math.log(math.comb(alpha, j)) + j * math.log(q) + (alpha - j) * math.log1p(-q)
                     + (j - 1) * j / (2 * sigma * sigma))
    top = max(terms)
    return min((top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1), full)
