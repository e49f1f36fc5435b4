"""The one-run audit's statistics, on synthetic scores with answers known by hand or in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy.audit import (
    EPSILON_CEILING,
    auc,
    audit,
    canaries_needed,
    epsilon_lower_bound,
    gaussian_estimate,
    gdp_epsilon,
    guess,
    guess_counts,
    largest_certifiable,
    p_value,
    tpr_at_fpr,
)


def logit(q: float) -> float:
    return math.log(q / (1 - q))


def coin_members(m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(m) < 0.5


def test_guesses_take_the_highest_scores_as_in_and_the_lowest_as_out():
    scores, members = [0.9, 0.1, 0.5, 0.7], [True, False, False, True]
    assert guess(scores, members, 1, 1).correct == 2  # 0.9 (in) and 0.1 (out)
    assert guess(scores, members, 3, 0).correct == 2  # 0.9, 0.7 right; 0.5 wrong
    assert guess(scores, members, 2, 2).correct == 4
    assert guess(scores, members, 0, 3).correct == 2  # 0.1 and 0.5 out, right; 0.7 wrong
    assert guess(scores, members, 0, 0).guesses == 0
    with pytest.raises(ValueError, match="cannot make"):
        guess(scores, members, 3, 2)


def test_p_value_without_delta_is_the_binomial_tail():
    assert p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(2 ** -10)
    assert p_value(10, 10, 10, math.log(3), 0.0) == pytest.approx(0.75 ** 10)
    # P[Binomial(4, 1/2) >= 3] = 5/16
    assert p_value(10, 4, 3, 0.0, 0.0) == pytest.approx(5 / 16)
    assert p_value(10, 4, 0, 3.0, 0.0) == 1.0


def test_p_value_delta_term_by_hand():
    """m = r = v = 2, q = 3/4: f(v-1) - f(v) = P[B=1] = 2q(1-q) = 0.375, (f(v-2) - f(v)) / 2 = (1 - q^2) / 2
    = 0.21875; the larger is 0.375, so p = q^2 + 2·m·δ·0.375."""
    delta = 0.01
    assert p_value(2, 2, 2, math.log(3), delta) == pytest.approx(0.5625 + 2 * 2 * delta * 0.375)
    assert p_value(2, 2, 2, math.log(3), 1.0) == 1.0  # capped


def test_lower_bound_in_closed_form_when_every_guess_is_right():
    """δ = 0 and v = r: the p-value is q^r, so the bound solves q^r = β: ε = logit(β^(1/r))."""
    for r, beta in ((20, 0.05), (100, 0.01), (7, 0.2)):
        assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(logit(beta ** (1 / r)), abs=1e-5)


def test_lower_bound_is_zero_when_chance_explains_the_guesses():
    assert epsilon_lower_bound(100, 100, 50, 1e-5, 0.05) == 0.0
    assert epsilon_lower_bound(100, 0, 0, 1e-5, 0.05) == 0.0
    # 4 of 4 right has probability 1/16 by chance: not significant at 5%
    assert epsilon_lower_bound(4, 4, 4, 0.0, 0.05) == 0.0


def test_delta_lowers_the_bound():
    bounds = [epsilon_lower_bound(1000, 200, 190, delta, 0.05) for delta in (0.0, 1e-6, 1e-4, 1e-3)]
    assert bounds[0] > 2
    assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False))


def test_guess_counts_are_a_1_2_5_grid_split_evenly_and_in_only():
    assert guess_counts(12) == [(1, 0), (1, 1), (2, 0), (3, 2), (5, 0), (5, 5), (10, 0), (6, 6), (12, 0)]
    assert len(guess_counts(1000)) == 19  # r in {1, 2, 5, ..., 500, 1000}, two splits each, (1, 0) once


def test_perfectly_separated_scores_give_a_clearly_positive_bound():
    m = 1000
    members = coin_members(m, seed=1)
    scores = members + np.random.default_rng(2).random(m) * 0.5  # every member above every non-member
    result = audit(scores, members, delta=1e-5)
    assert result.epsilon_lower_bound > 3
    assert result.correct == result.guesses  # every guess right
    assert result.auc == 1.0 and result.tpr_at_fpr == 1.0
    assert (result.canaries, result.members, result.hypotheses) == (m, members.sum(), 19)


@pytest.mark.parametrize("seed", range(5))
def test_identical_distributions_give_a_bound_near_zero(seed):
    m = 1000
    members = coin_members(m, seed)
    scores = np.random.default_rng(seed + 100).normal(size=m)  # the same distribution in and out
    result = audit(scores, members, delta=1e-5)
    assert result.epsilon_lower_bound <= 0.05
    assert abs(result.auc - 0.5) < 0.06


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_randomized_response_is_audited_below_its_true_epsilon(epsilon):
    """A mechanism that is exactly ε-DP per canary: each canary's score is its true membership,
    flipped with probability 1 / (1 + e^ε) (randomized response). The bound must not exceed ε, and
    with 2000 canaries it should recover a good share of it."""
    m = 2000
    for seed in range(5):
        rng = np.random.default_rng(seed)
        members = rng.random(m) < 0.5
        truthful = rng.random(m) < 1 / (1 + math.exp(-epsilon))
        scores = np.where(truthful, members, ~members).astype(float) + rng.random(m) * 1e-3  # break ties
        bound = audit(scores, members, delta=0.0).epsilon_lower_bound
        assert 0.5 * epsilon < bound <= epsilon


def test_bound_shrinks_as_the_confidence_grows():
    m = 500
    members = coin_members(m, seed=3)
    scores = members * 1.5 + np.random.default_rng(4).normal(size=m)  # overlapping, separated on average
    bounds = [audit(scores, members, 1e-5, confidence).epsilon_lower_bound
              for confidence in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)]
    assert bounds[0] > 0
    assert all(a >= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] > bounds[-1]


def test_tpr_at_low_fpr_by_hand():
    outside = list(range(100))  # 100 non-members: 1% allows exactly one false positive (the 99)
    inside = [98.5, 99.5, 50.0]  # above the 98: two of three
    scores, members = inside + outside, [True] * 3 + [False] * 100
    assert tpr_at_fpr(scores, members, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, members, 0.0) == pytest.approx(1 / 3)  # above every non-member: 99.5 only
    assert tpr_at_fpr([1.0, 0.0], [True, True]) is None


def test_auc_by_hand_with_a_tie():
    # pairs (in, out): (3, 1) win, (3, 2) win, (2, 1) win, (2, 2) tie -> 3.5 / 4
    assert auc([3.0, 2.0, 1.0, 2.0], [True, True, False, False]) == pytest.approx(3.5 / 4)
    assert auc([1.0], [False]) is None


def test_auc_and_tpr_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    members = rng.random(400) < 0.5
    scores = np.round(members * 0.8 + rng.normal(size=400), 1)  # rounded: many ties
    assert auc(scores, members) == pytest.approx(metrics.roc_auc_score(members, scores))
    fpr, tpr, _ = metrics.roc_curve(members, scores, drop_intermediate=False)
    for target in (0.0, 0.01, 0.05, 0.2):
        assert tpr_at_fpr(scores, members, target) == pytest.approx(tpr[fpr <= target + 1e-12].max())


def test_largest_certifiable_is_the_bound_for_perfect_guesses_in_closed_form():
    """64 canaries, 32 in: a perfect attack gets all 64 guesses of the (32, 32) split right. Without δ
    the bound is where q^64 = significance, q = e^ε / (1 + e^ε): ε = logit(significance^(1/64))."""
    members = [i % 2 == 0 for i in range(64)]
    significance = 0.05 / len(guess_counts(64))
    expected = logit(significance ** (1 / 64))
    assert largest_certifiable(members, delta=0.0, confidence=0.95) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_scores_certify_more_than_the_largest_certifiable(seed):
    rng = np.random.default_rng(seed)
    members = list(rng.random(200) < 0.5)
    ceiling = largest_certifiable(members, delta=1e-5)
    leaky = np.asarray(members, dtype=float) * 1.5 + rng.normal(size=200)  # a fair but imperfect attack
    result = audit(list(leaky), members, delta=1e-5)
    assert 0 < result.epsilon_lower_bound < ceiling == result.largest_certifiable
    assert audit([float(m) for m in members], members, delta=1e-5).epsilon_lower_bound == ceiling


def test_power_grows_with_the_canaries_until_delta_caps_it():
    ceilings = [largest_certifiable([i % 2 == 0 for i in range(m)], delta=1e-5) for m in (16, 64, 500, 5000)]
    assert ceilings == sorted(ceilings) and ceilings[0] < 1 < 2 < ceilings[1] < 3 < 4 < ceilings[2]
    assert ceilings[3] < 6, "2·m·δ caps what any number of canaries can certify at δ = 1e-5"


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0])
def test_canaries_needed_is_the_fewest_that_can_certify_the_target(target):
    needed = canaries_needed(target, delta=1e-5)
    assert largest_certifiable([i % 2 == 0 for i in range(needed)], delta=1e-5) >= target
    assert largest_certifiable([i % 2 == 0 for i in range(needed - 1)], delta=1e-5) < target


def test_no_number_of_canaries_certifies_epsilon_8_at_delta_1e_5():
    assert canaries_needed(8.0, delta=1e-5) is None
    assert canaries_needed(8.0, delta=1e-9) is not None  # a smaller δ lifts the cap


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_gdp_epsilon_matches_an_independent_accountant(mu):
    """ε(δ) of μ-GDP is the Gaussian mechanism's with noise multiplier 1/μ: dp-accounting's PLD agrees."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1 / mu))
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-4)
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and gdp_epsilon(-1.0, 1e-5) == 0.0
    assert gdp_epsilon(1e-5, 1e-5) == 0.0  # δ(0) = 2Φ(μ/2) − 1 ≈ 4e-6 ≤ δ: no ε needed
    assert gdp_epsilon(math.inf, 1e-5) == gdp_epsilon(60.0, 1e-5) == EPSILON_CEILING


def test_pooled_gaussian_estimate_is_centred_and_its_interval_covers():
    """40 simulated audits, 250 member scores N(1, 1) and 250 non-member scores N(0, 1): the estimate
    of ε (4.38 at δ = 1e-5) is centred with a narrow spread, and its 95% interval covers the truth
    in most of them. Fitting the two variances apart (the paper's way) gave a median of 4.97 and a
    95th percentile of 7.64 on these draws."""
    rng = np.random.default_rng(0)
    truth = gdp_epsilon(1.0, 1e-5)
    members = [True] * 250 + [False] * 250
    estimates = [gaussian_estimate(list(np.concatenate([rng.normal(1, 1, 250), rng.normal(0, 1, 250)])), members,
                                   1e-5) for _ in range(40)]
    values = np.array([e.epsilon for e in estimates])
    assert abs(np.median(values) - truth) < 0.3 and np.percentile(values, 95) < truth + 1.0
    covered = sum(low <= truth <= high for low, high in (e.epsilon_interval for e in estimates))
    assert covered >= 34  # about 95% of 40
    assert gaussian_estimate([1.0, 2.0, 3.0], [True, False, False], 1e-5) is None  # one member: nothing to fit
    shifted = gaussian_estimate([0.0, 0.1, 5.0, 5.1], [False, False, True, True], 1e-5)
    assert shifted.mu > 50 and shifted.epsilon == EPSILON_CEILING
