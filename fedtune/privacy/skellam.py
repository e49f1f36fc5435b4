"""Distributed DP's mechanism: integer shares with Skellam noise (issue #19; docs/privacy.md,
"Distributed DP over SecAgg+").

Each institution rounds before it adds noise, so that what SecAgg+ sums is an integer mechanism whose
analysis covers the coordinator too (the Skellam mechanism of Agarwal, Kairouz and Liu, NeurIPS 2021):

- Every record's clipped gradient g (‖g‖ ≤ C) is scaled to γ·g with γ = SCALE / C and rounded to an
  integer vector R by conditional randomized rounding: each coordinate up or down at random with the
  institution's own secret randomness, redrawn until ‖R‖₂ ≤ Δ₂ (`l2_sensitivity`). The bound is
  enforced, not assumed: a record whose draws keep failing is rounded toward zero, which never grows
  it. For integers |v| ≤ v², so ‖R‖₁ ≤ min(Δ₂², √d·Δ₂) = Δ₁.
- The institution adds Skellam noise Sk = Poisson(v/2t) − Poisson(v/2t) per coordinate to its integer
  sum. A sum of independent Skellam variables is Skellam, so t honest institutions' shares add up to
  Sk of variance v, whatever the others add: no rounding happens after the noise. (The Poisson draws
  are NumPy's, a floating-point sampler, as Opacus' Gaussian draws are; the analysis assumes exact
  ones, like every floating-point DP implementation.)
- Adding or removing one record changes the integer sum by one R. The Skellam mechanism with variance
  v is then (α, ε(α))-RDP for every integer α > 1 with (AKL 2021, Corollary 3.6, in variance form)
      ε(α) ≤ α·Δ₂²/(2v) + min(((2α − 1)·Δ₂² + 6·Δ₁)/(4v²), 3·Δ₁/(2v)).
  `variance_for` picks v a hair above (σ·Δ₂)², so that ε(α) ≤ α/(2σ²), the Gaussian mechanism's RDP at
  noise multiplier σ, at every order in ORDERS. A step is then accounted as the Gaussian's at those
  orders, which is what `SkellamAccountant` does; the ledger keeps its (σ, q, steps) history.
- Poisson subsampling at q < 1 (train.sample_rate): a step's RDP at integer order α is at most the sampled
  Gaussian's at σ, log(Σ_l C(α,l)·(1 − q)^(α−l)·q^l·e^((l−1)·l/(2σ²))) / (α − 1) (Mironov, Talwar, Zhang
  2019), which Opacus computes exactly at integer orders and `_one_step` takes from it. Why that
  formula bounds Skellam steps too (docs/privacy.md, "Subsampled Skellam steps", has the derivation):
  1. Fix every draw but whether one record x is sampled and the honest institutions' noise: the other
     records' samples, all rounding, the honest institutions' integer sums and the dishonest ones' shares.
     x's rounded vector r is fixed too: each record's rounding draws are fresh and independent of the
     others', so r may be taken as drawn whether or not x is sampled. The release is then Sk(s) without x
     and (1 − q)·Sk(s) + q·Sk(s + r) with x, Sk being the honest shares' noise (variance at least v): the
     Poisson-subsampled two-point mechanism {Sk(s), Sk(s + r)}.
  2. That pair meets the condition of Zhu and Wang's Theorem 8 (ICML 2019, "Poisson Subsampled Rényi
     Differential Privacy"), non-negative Pearson-Vajda χ^l pseudo-divergences at odd l, in both orders:
     the reflection y ↦ 2s + r − y swaps Sk(s) and Sk(s + r) (the noise is symmetric) and turns the
     likelihood ratio L into 1/L, so E[(L − 1)^l] = ½·E[(L − 1)^l·(1 − L^(1−l))], whose integrand is never
     negative. The theorem then bounds both directions (add and remove) by the formula above, fed with
     any RDP bound of the pair: ε(l) ≤ l/(2σ²), and the formula grows with each ε(l).
  3. The release is a mixture of such pairs, with the same weights with and without x; the Rényi power
     divergence is jointly convex, so the bound holds for the mixture.
  RDP converts to (ε, δ) as Opacus' RDP accountant does (valid for any mechanism).

Written here rather than taken from a library: Opacus and dp-accounting have no Skellam mechanism. The
subsampled RDP is Opacus' own sampled-Gaussian computation, and the derivation above is why it applies.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ORDERS = tuple(range(2, 129))  # integer Rényi orders: the Skellam bound is proven at integer α
SCALE = 2**12  # integer units per clipping norm C: γ = SCALE / C
ROUNDING_FAILURE = 1e-3  # β: the chance, per draw, that a record's rounding exceeds Δ₂ and is redrawn
ROUNDING_DRAWS = 20
MAX_SIGMA = 1e6  # solve_sigma gives up here, as Opacus' get_noise_multiplier does


def l2_sensitivity(dim: int, scale: int = SCALE) -> float:
    """Δ₂: the norm every rounded record gradient is held to. A vector of norm at most c = SCALE rounds to
    norm at most √(c² + d/4 + √(2 ln(1/β))·(c + √d/2)) with probability at least 1 − β per draw
    (Kairouz, Liu, Steinke 2021, conditional randomized rounding); only the draw's speed rests on it."""
    slack = math.sqrt(2 * math.log(1 / ROUNDING_FAILURE))
    return math.sqrt(scale**2 + dim / 4 + slack * (scale + math.sqrt(dim) / 2))


def l1_sensitivity(dim: int, l2: float) -> float:
    """Δ₁ of an integer vector of norm at most Δ₂: |v| ≤ v² for every integer, and Cauchy-Schwarz."""
    return min(l2**2, math.sqrt(dim) * l2)


def skellam_rdp(alpha: int, l1: float, l2: float, variance: float) -> float:
    """ε(α) of the Skellam mechanism with per-coordinate variance `variance` (AKL 2021, Cor. 3.6)."""
    return alpha * l2**2 / (2 * variance) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2),
                                                3 * l1 / (2 * variance))


def variance_for(sigma: float, dim: int, scale: int = SCALE) -> float:
    """The sum's Skellam variance v for noise multiplier σ: the smallest v = (σΔ₂)²·(1 + κ), κ a power of
    two, whose RDP is at most the Gaussian's α/(2σ²) at every order in ORDERS."""
    l2 = l2_sensitivity(dim, scale)
    l1 = l1_sensitivity(dim, l2)
    base, kappa = (sigma * l2) ** 2, 2.0**-40
    while any(skellam_rdp(a, l1, l2, base * (1 + kappa)) > a / (2 * sigma**2) for a in ORDERS):
        kappa *= 2
    return base * (1 + kappa)


def share_variance(sigma: float, dim: int, min_honest: int) -> float:
    """The variance each of t institutions adds: v(σ/√t), so that one share alone is no worse than the
    Gaussian at σ/√t (what the privacy report states against the coordinator), and t shares, of variance
    t·v(σ/√t) ≥ v(σ) (κ only grows as σ shrinks), no worse than the Gaussian at σ."""
    return variance_for(sigma / math.sqrt(min_honest), dim) if sigma > 0 else 0.0


def round_records(scaled: torch.Tensor, l2: float, generator: torch.Generator) -> torch.Tensor:
    """Conditional randomized rounding of each row (one record's γ·g) to integers of norm at most `l2`, in
    float64 (exact: every value is far below 2^53). Rows still above it after ROUNDING_DRAWS draws are
    rounded toward zero, which never increases a coordinate's magnitude."""
    scaled = scaled.to(torch.float64)
    floor = scaled.floor()
    frac = scaled - floor
    out = torch.empty_like(scaled)
    pending = torch.arange(len(scaled), device=scaled.device)
    for _ in range(ROUNDING_DRAWS):
        if not len(pending):
            return out
        up = torch.rand(frac[pending].shape, generator=generator, dtype=torch.float64, device=scaled.device)
        draw = floor[pending] + (up < frac[pending]).to(torch.float64)
        ok = draw.square().sum(dim=1) <= math.floor(l2**2)  # exact: integers, far below 2^53
        out[pending[ok]] = draw[ok]
        pending = pending[~ok]
    out[pending] = scaled[pending].trunc()
    return out


def skellam_noise(size: int, variance: float, seed: int) -> np.ndarray:
    """`size` independent Skellam variables of variance `variance` (Poisson(v/2) − Poisson(v/2)), int64."""
    rng = np.random.Generator(np.random.Philox(key=seed))
    half = variance / 2
    return rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)


# ---- accounting ------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _one_step(sigma: float, q: float) -> np.ndarray:
    """One step's RDP bound at ORDERS: the sampled Gaussian's at σ and q (module docstring, item 1 to 3)."""
    out = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS)))
    out.setflags(write=False)
    return out


def epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """(ε at δ) of a (σ, q, steps) history of Skellam steps; inf if any ran without noise."""
    return spent(history, delta)[0]


def spent(history: Sequence[Sequence[float]], delta: float) -> tuple[float, float]:
    """(ε at δ, the Rényi order it was converted at) of a (σ, q, steps) history, as Opacus' get_privacy_spent."""
    runs = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not runs:
        return 0.0, float(ORDERS[0])
    if any(s <= 0 for s, _, _ in runs):
        return math.inf, float(ORDERS[0])
    rdp = sum(_one_step(s, q) * n for s, q, n in runs)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": orders below 2 are not proven here
        warnings.simplefilter("ignore", UserWarning)
        eps, order = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps), float(order)


def solve_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float = 0.005) -> float:
    """The σ (within `tolerance` in ε, from above) whose `steps` Skellam steps at q spend `target_epsilon`."""
    low, high = 0.0, 1.0
    while epsilon([(high, sample_rate, steps)], delta) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:  # integer orders up to 128 certify no ε below about log(1/δ)/127, whatever σ
            raise ValueError(f"The privacy budget is too low: the Skellam accountant certifies no ε as small as "
                             f"{target_epsilon} at δ = {delta} (its Rényi orders end at {ORDERS[-1]}); raise the "
                             "target ε.")
    while True:
        mid = (low + high) / 2
        eps = epsilon([(mid, sample_rate, steps)], delta)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if eps >= target_epsilon - tolerance:
                return high


class SkellamAccountant(RDPAccountant):
    """Opacus' accountant interface (step, get_epsilon, state_dict) for Skellam steps: the history is
    RDPAccountant's (σ, q, steps), and ε is `epsilon`'s: the sampled Gaussian's RDP at integer orders."""

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        return spent(self.history, delta)

    def get_epsilon(self, delta: float, alphas=None, **kwargs) -> float:
        return epsilon(self.history, delta)

    @classmethod
    def mechanism(cls) -> str:
        return "skellam"
