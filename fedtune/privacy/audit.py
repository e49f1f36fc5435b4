"""The empirical privacy audit's statistics: pure functions of canary scores and membership.

The estimator is the one-run audit of Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv 2305.08846). m canaries are each put into the training data
independently with probability 1/2. After training, the auditor guesses "in" for the k+ canaries
with the highest scores, "out" for the k- lowest, and abstains on the rest. If training is
(ε, δ)-DP with respect to each canary, the number W of correct guesses among the r = k+ + k-
guesses satisfies (their Theorem 5.2), for every v:

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{1 ≤ i ≤ m} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v].

The right-hand side is a p-value for the hypothesis "the run is (ε, δ)-DP". The lower bound is the
largest ε that the observed count still rejects at significance 1 − confidence.

A higher score must mean "more likely in"; for the audit, the score is minus the canary's loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

AUDIT_FILE = "audit.json"  # in the run directory: written by `fedtune audit`, read by the privacy report
EPSILON_CEILING = 100.0  # e^100: a bound beyond this says nothing more (and expit rounds to 1 in float64)


@dataclass(frozen=True)
class Guesses:
    guesses_in: int  # k+: the highest scores, guessed "in"
    guesses_out: int  # k-: the lowest scores, guessed "out"
    correct: int

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out


@dataclass(frozen=True)
class AuditResult:
    canaries: int  # m
    members: int  # canaries that were put into training
    guesses_in: int
    guesses_out: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    delta: float
    hypotheses: int  # (k+, k-) choices tried; each was tested at (1 - confidence) / hypotheses
    auc: float | None  # None when all canaries are in, or all out
    tpr_at_fpr: float | None
    fpr: float
    largest_certifiable: float  # the bound had every canary been scored perfectly: the audit's power

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out


def guess(scores: Sequence[float], members: Sequence[bool], guesses_in: int, guesses_out: int) -> Guesses:
    """Guess "in" for the `guesses_in` highest scores, "out" for the `guesses_out` lowest, abstain on
    the rest, and count the correct guesses. Ties are broken by canary order (a stable sort), which
    is independent of membership since each canary's membership is an independent coin."""
    m = len(scores)
    if len(members) != m:
        raise ValueError(f"{m} scores but {len(members)} membership flags")
    if guesses_in < 0 or guesses_out < 0 or guesses_in + guesses_out > m:
        raise ValueError(f"cannot make {guesses_in} + {guesses_out} guesses about {m} canaries")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    member = np.asarray(members, dtype=bool)[order]
    correct = int(member[:guesses_in].sum()) + int((~member[m - guesses_out:]).sum() if guesses_out else 0)
    return Guesses(guesses_in, guesses_out, correct)


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Theorem 5.2's bound on P[W ≥ correct] for an (ε, δ)-DP run: the p-value of that hypothesis."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    q = special.expit(epsilon)  # e^ε / (1 + e^ε): the accuracy of ε-DP randomized response
    tail = stats.binom.sf(correct - 1, guesses, q)  # f(v) = P[Binomial(r, q) ≥ v]
    if delta == 0 or correct == 0:
        return float(min(tail, 1.0))
    # f(v − i) − f(v) = P[v − i ≤ Binomial < v], the sum of the pmf at v−1 .. v−i: summed from the
    # pmf, not as a difference of tails, which cancels catastrophically when q is near 1. For i ≥ v
    # the difference stays 1 − f(v), so its ratio to i is largest at i = v and larger i add nothing.
    below = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return float(min(tail + 2 * canaries * delta * alpha, 1.0))


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε at which `correct` of `guesses` right still has p-value ≤ significance (0 if
    even ε = 0 is not rejected).

    The p-value grows with ε in practice: the binomial tail does, and the δ term is small beside it
    (the tests check that the bound falls as the confidence rises). Any ε below a rejected one is
    rejected too, because (ε, δ)-DP implies (ε', δ)-DP for every ε' > ε, so the bound is where the
    p-value crosses the significance level: bracketed by doubling, then found by Brent's method."""
    if p_value(canaries, guesses, correct, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(canaries, guesses, correct, hi, delta) <= significance:
        if hi >= EPSILON_CEILING:
            return EPSILON_CEILING
        lo, hi = hi, min(2 * hi, EPSILON_CEILING)
    return float(optimize.brentq(lambda eps: p_value(canaries, guesses, correct, eps, delta) - significance,
                                 lo, hi, xtol=1e-6))


def guess_counts(canaries: int) -> list[tuple[int, int]]:
    """The (k+, k-) pairs the audit tries: r = k+ + k- on a 1-2-5 grid up to m, plus m itself, each
    split evenly (k+ = ⌈r/2⌉) and as "in" guesses only. The paper's experiments likewise try several
    numbers of guesses and keep the best; a short grid keeps the multiple-testing cost small."""
    totals, step = {canaries}, 1
    while step <= canaries:
        totals.update(t for t in (step, 2 * step, 5 * step) if t <= canaries)
        step *= 10
    pairs = {(math.ceil(r / 2), r // 2) for r in totals} | {(r, 0) for r in totals}
    return sorted(pairs, key=lambda pair: (sum(pair), pair))


def audit(scores: Sequence[float], members: Sequence[bool], delta: float, confidence: float = 0.95,
          fpr: float = 0.01) -> AuditResult:
    """The ε lower bound over the guess counts of `guess_counts`, with AUC and TPR at `fpr`.

    Trying several guess counts and keeping the best is a multiple test. It is accounted for by a
    Bonferroni correction: each of the H choices is tested at significance (1 − confidence) / H, so
    the chance that any of them overstates ε is at most 1 − confidence, and the reported bound (the
    largest of the H) holds at the stated confidence."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = len(scores)
    if m == 0:
        raise ValueError("no canaries to audit")
    bound, chosen = _best_guesses(scores, members, delta, confidence)
    return AuditResult(canaries=m, members=int(np.sum(np.asarray(members, dtype=bool))),
                       guesses_in=chosen.guesses_in, guesses_out=chosen.guesses_out, correct=chosen.correct,
                       epsilon_lower_bound=bound, confidence=confidence, delta=delta, hypotheses=len(guess_counts(m)),
                       auc=auc(scores, members), tpr_at_fpr=tpr_at_fpr(scores, members, fpr), fpr=fpr,
                       largest_certifiable=largest_certifiable(members, delta, confidence))


def _best_guesses(scores: Sequence[float], members: Sequence[bool], delta: float,
                  confidence: float) -> tuple[float, Guesses]:
    """(the largest bound over the guess counts, the guesses that gave it), Bonferroni-corrected."""
    m = len(scores)
    pairs = guess_counts(m)
    significance = (1 - confidence) / len(pairs)
    best: tuple[float, float, Guesses] | None = None  # (bound, -p-value at ε = 0, guesses): the largest wins
    for k_in, k_out in pairs:
        made = guess(scores, members, k_in, k_out)
        bound = epsilon_lower_bound(m, made.guesses, made.correct, delta, significance)
        # When no choice rejects even ε = 0, report the one with the most evidence (smallest p-value).
        key = (bound, -p_value(m, made.guesses, made.correct, 0.0, delta), made)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[0], best[2]


def largest_certifiable(members: Sequence[bool], delta: float, confidence: float = 0.95) -> float:
    """The audit's power: the largest lower bound it could report for these canaries, had an attack
    scored every member above every non-member (the same guess counts and correction as `audit`).

    A bound far below the theoretical ε means little when this ceiling is low too: the audit could
    not have seen a larger leak. It depends only on m, the members' count, δ and the confidence."""
    perfect = [float(member) for member in members]
    return _best_guesses(perfect, members, delta, confidence)[0]


MAX_CANARIES = 100_000  # `canaries_needed` looks no further: each canary is a record to score after training


def canaries_needed(target_epsilon: float, delta: float, confidence: float = 0.95) -> int | None:
    """The fewest canaries m whose `largest_certifiable` (with half of them in training, as expected)
    reaches `target_epsilon`: what an audit needs to be able to show a leak of that size at all. None
    if even MAX_CANARIES do not (δ's term, 2·m·δ, grows with m and caps what any m can certify).

    Found by doubling m, then bisecting between the last m that falls short and the first that
    reaches it; the m returned always reaches the target."""
    def reaches(m: int) -> bool:
        return largest_certifiable([i % 2 == 0 for i in range(m)], delta, confidence) >= target_epsilon

    low, high = 1, 2
    while not reaches(high):
        if high >= MAX_CANARIES:
            return None
        low, high = high, min(2 * high, MAX_CANARIES)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high


def _split(scores: Sequence[float], members: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    values, member = np.asarray(scores, dtype=float), np.asarray(members, dtype=bool)
    return values[member], values[~member]


def auc(scores: Sequence[float], members: Sequence[bool]) -> float | None:
    """Area under the ROC curve of "in if score ≥ t": the probability that a random member outscores a
    random non-member, ties counting one half (the Mann–Whitney statistic, from average ranks)."""
    inside, outside = _split(scores, members)
    if not len(inside) or not len(outside):
        return None
    ranks = stats.rankdata(np.concatenate([inside, outside]))  # ties get their average rank
    wins = ranks[: len(inside)].sum() - len(inside) * (len(inside) + 1) / 2
    return float(wins / (len(inside) * len(outside)))


def tpr_at_fpr(scores: Sequence[float], members: Sequence[bool], fpr: float = 0.01) -> float | None:
    """The highest true-positive rate of a threshold rule "in if score > t" whose false-positive rate is
    at most `fpr` (no interpolation between thresholds). With fewer than 1/fpr non-members it allows
    no false positive at all: the share of members above every non-member."""
    inside, outside = _split(scores, members)
    if not len(inside) or not len(outside):
        return None
    allowed = math.floor(fpr * len(outside) + 1e-9)  # false positives allowed (1e-9: 0.01 * 100 is not 1 in binary)
    if allowed >= len(outside):
        return 1.0
    threshold = np.sort(outside)[::-1][allowed]  # the highest non-member score that must stay below t
    return float(np.mean(inside > threshold))


@dataclass(frozen=True)
class GaussianEstimate:
    """Andrew et al.'s one-shot estimate: a Gaussian fitted to the members' scores and one to the
    non-members', and the ε of telling them apart at δ."""

    mean_in: float
    mean_out: float
    std: float  # pooled: both Gaussians get it
    mu: float  # (mean_in − mean_out) / std: the pair is μ-GDP
    epsilon: float
    epsilon_interval: tuple[float, float]  # ε at μ ∓ 1.96 standard errors: the estimate's sampling error


def gaussian_estimate(scores: Sequence[float], members: Sequence[bool], delta: float) -> GaussianEstimate | None:
    """The one-shot estimate of Andrew et al. 2024 ("One-shot Empirical Privacy Estimation for
    Federated Learning", ICLR; arXiv 2302.03098): Gaussians fitted to the members' and the
    non-members' scores, and the ε at δ of the mechanism whose outputs they are.

    It is an estimate, not a bound: it assumes the scores are Gaussian, which the paper proves for
    the cosines of random canaries under the Gaussian mechanism as the dimension grows, and it has no
    confidence level (`epsilon_interval` gives its sampling error: with 200 members and 200
    non-members μ is known to about ±0.2, and at small ε that is a factor of two). Unlike the
    paper, both Gaussians share one pooled variance, as they do under the Gaussian mechanism:
    fitted separately from a few hundred scores, the variances differ by chance and the tails
    decide ε at small δ. Over 40 simulated draws of 250 + 250 scores with μ = 1 (ε = 4.38 at
    δ = 1e-5), separate fits gave a median of 4.97 and a 95th percentile of 7.64, the pooled fit
    4.44 and 5.10 (tests/privacy/test_audit.py checks the pooled fit's spread). Then the pair is
    μ-GDP with μ = (mean_in − mean_out) / std, and ε(δ) is the Gaussian mechanism's (Opacus'
    eps_from_mu; the estimate is 0 when members score no higher). None with fewer than 2 members or 2 non-members."""
    inside, outside = _split(scores, members)
    if len(inside) < 2 or len(outside) < 2:
        return None
    std = math.sqrt((inside.var(ddof=1) * (len(inside) - 1) + outside.var(ddof=1) * (len(outside) - 1))
                    / (len(inside) + len(outside) - 2))
    gap = float(inside.mean() - outside.mean())
    mu = math.inf if std == 0 and gap > 0 else gap / std if std > 0 else 0.0
    # The standard error of a standardized difference of means (Hedges & Olkin 1985, large-sample form).
    n_in, n_out = len(inside), len(outside)
    stderr = math.sqrt(1 / n_in + 1 / n_out + (mu ** 2 if math.isfinite(mu) else 0.0) / (2 * (n_in + n_out)))
    interval = (gdp_epsilon(mu - 1.96 * stderr, delta), gdp_epsilon(mu + 1.96 * stderr, delta))
    return GaussianEstimate(float(inside.mean()), float(outside.mean()), std, mu, gdp_epsilon(mu, delta), interval)


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of a μ-GDP mechanism (Dong, Roth & Su 2019), capped at EPSILON_CEILING; 0 for μ ≤ 0."""
    from opacus.accountants.analysis.gdp import delta_eps_mu, eps_from_mu

    if mu <= 0 or delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    if not math.isfinite(mu) or delta_eps_mu(eps=EPSILON_CEILING, mu=mu) > delta:
        return EPSILON_CEILING
    return float(eps_from_mu(mu=mu, delta=delta))
