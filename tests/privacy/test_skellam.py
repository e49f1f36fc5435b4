"""Distributed DP's Skellam mechanism (privacy/skellam.py): the published RDP bound covers the exact Rényi
divergence, the calibrated variance is no worse than the Gaussian at σ, a shifted Skellam pair meets the
condition of the tight subsampling bound and a subsampled step stays within it in both directions, ε matches
an independent implementation, and rounding holds every record to Δ₂."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from fedtune.privacy import skellam
from fedtune.privacy.accountant import epsilon, make_accountant
from fedtune.privacy.independent import epsilons_along


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    """D_α(P‖Q) of two log-pmfs on the same support (where both are finite: what is left out has
    negligible mass and only lowers the value)."""
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[keep] - (alpha - 1) * log_q[keep])) / (alpha - 1)


@pytest.mark.parametrize(("variance", "shift"), [(8.0, 1), (50.0, 3), (200.0, 2)])
def test_the_bound_covers_the_exact_renyi_divergence_of_a_shifted_skellam(variance, shift):
    """One coordinate: Sk of variance v against Sk + Δ, in both directions (Δ₁ = Δ₂ = Δ)."""
    support = np.arange(-400, 401)
    base = stats.skellam.logpmf(support, variance / 2, variance / 2)
    moved = stats.skellam.logpmf(support - shift, variance / 2, variance / 2)
    assert np.exp(base[np.isfinite(base)]).sum() == pytest.approx(1.0, abs=1e-9)
    for alpha in (2, 3, 5, 8, 16):
        exact = max(_renyi(moved, base, alpha), _renyi(base, moved, alpha))
        bound = skellam.skellam_rdp(alpha, shift, shift, variance)
        assert exact <= bound
        assert bound <= 1.5 * alpha * shift**2 / (2 * variance), "not vacuous: close to the Gaussian's"


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.5])
@pytest.mark.parametrize("dim", [10, 74_000, 2_000_000])
def test_the_calibrated_variance_is_no_worse_than_the_gaussian_at_every_order(sigma, dim):
    l2 = skellam.l2_sensitivity(dim)
    l1 = skellam.l1_sensitivity(dim, l2)
    variance = skellam.variance_for(sigma, dim)
    assert all(skellam.skellam_rdp(a, l1, l2, variance) <= a / (2 * sigma**2) for a in skellam.ORDERS)
    assert variance == pytest.approx((sigma * l2) ** 2, rel=1e-4), "a hair above the Gaussian's variance"


def test_a_share_alone_and_t_shares_together_are_each_no_worse_than_their_gaussian():
    dim, sigma, t = 74_000, 1.2, 16
    l2 = skellam.l2_sensitivity(dim)
    l1 = skellam.l1_sensitivity(dim, l2)
    share = skellam.share_variance(sigma, dim, t)
    for variance, s in ((share, sigma / math.sqrt(t)), (t * share, sigma)):
        assert all(skellam.skellam_rdp(a, l1, l2, variance) <= a / (2 * s**2) for a in skellam.ORDERS)


def _skellam_pair(variance: float, shift: np.ndarray, width: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """The pmfs of Sk(0) and Sk(shift) (a product over coordinates) on a grid wide enough that what it
    leaves out is negligible, each renormalized."""
    axes = [np.arange(-width, width + 1)] * len(shift)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(shift))
    base = stats.skellam.pmf(grid, variance / 2, variance / 2).prod(axis=1)
    moved = stats.skellam.pmf(grid - shift, variance / 2, variance / 2).prod(axis=1)
    return base / base.sum(), moved / moved.sum()


@pytest.mark.parametrize(("variance", "shift"), [(1.0, [1]), (3.0, [2]), (10.0, [5]), (2.0, [1, -2]), (6.0, [3, 1])])
def test_a_shifted_skellam_pair_meets_zhu_and_wangs_condition_for_the_tight_subsampling_bound(variance, shift):
    """Theorem 8 of Zhu and Wang (2019) needs every odd Pearson-Vajda pseudo-divergence E_Q[(P/Q − 1)^l] to be
    non-negative, in both orders. privacy/skellam.py derives it from the noise's symmetry; here it is computed."""
    p, q = _skellam_pair(variance, np.array(shift))
    keep = (p > 0) & (q > 0)
    for a, b in ((p[keep], q[keep]), (q[keep], p[keep])):
        for odd in (3, 5, 7, 9, 11):
            assert float(np.sum(b * (a / b - 1) ** odd)) >= 0.0


@pytest.mark.parametrize(("variance", "shift"), [(2.0, 1), (8.0, 2), (30.0, 3)])
@pytest.mark.parametrize("q", [0.1, 0.25, 0.5])
def test_a_subsampled_skellam_step_is_within_the_bound_in_both_directions(variance, shift, q):
    """The exact Rényi divergences of a Poisson-subsampled Skellam step, with and without the record, against
    the accountant's one-step bound at the σ whose Gaussian RDP covers this pair's (AKL's bound ≤ l/(2σ²))."""
    orders = range(2, 13)
    sigma = min(math.sqrt(a / (2 * skellam.skellam_rdp(a, shift, shift, variance))) for a in orders)
    p, moved = _skellam_pair(variance, np.array([shift]), width=120)
    mixture = (1 - q) * p + q * moved
    bound = skellam._one_step(sigma, q)
    for a in orders:
        exact = max(_renyi(np.log(mixture), np.log(p), a), _renyi(np.log(p), np.log(mixture), a))
        assert exact <= bound[a - 2] * (1 + 1e-9)


@pytest.mark.parametrize(("sigma", "q"), [(0.8, 0.1), (1.96, 0.25), (3.0, 0.5), (3.5, 1.0)])
def test_one_step_is_dp_accountings_sampled_gaussian_at_the_integer_orders(sigma, q):
    import dp_accounting as dpa
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    accountant = RdpAccountant(orders=list(skellam.ORDERS))
    accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), 1)
    np.testing.assert_allclose(skellam._one_step(sigma, q), accountant._rdp, rtol=1e-9)


def test_a_target_below_what_the_integer_orders_can_certify_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="privacy budget is too low"):
        skellam.solve_sigma(0.04, 1e-5, 1.0, 1)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(3.5, 1.0, 30), (4.9, 0.5, 60), (2.0, 0.1, 200)])
def test_epsilon_matches_the_independent_implementation(sigma, q, steps):
    ours = skellam.epsilon([(sigma, q, steps)], 1e-5)
    theirs = epsilons_along("skellam", [(sigma, q, steps)], [1e-5])[0]
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_at_full_batch_epsilon_is_dp_accountings_gaussian_at_the_integer_orders():
    import dp_accounting as dpa
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    accountant = RdpAccountant(orders=list(skellam.ORDERS))
    accountant.compose(dpa.GaussianDpEvent(3.0), 40)
    assert skellam.epsilon([(3.0, 1.0, 40)], 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)


def test_the_solved_sigma_spends_the_target_and_the_accountant_continues_a_history():
    sigma = skellam.solve_sigma(8.0, 1e-5, 1.0, 30)
    assert 8.0 - 0.005 <= skellam.epsilon([(sigma, 1.0, 30)], 1e-5) <= 8.0
    accountant = make_accountant("skellam", [(sigma, 1.0, 29)])
    accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    assert accountant.history == [(sigma, 1.0, 30)]
    assert accountant.get_epsilon(1e-5) == epsilon("skellam", [(sigma, 1.0, 30)], 1e-5)
    assert make_accountant("skellam", accountant.state_dict()["history"]).history == accountant.history


def test_rounding_holds_every_record_to_the_bound_and_is_unbiased():
    dim, rows = 1000, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * skellam.SCALE * 0.999  # clipped records, γ·g
    l2 = skellam.l2_sensitivity(dim)
    draws = torch.stack([skellam.round_records(x, l2, g) for _ in range(50)])
    assert (draws == draws.round()).all(), "integers"
    assert (draws.norm(dim=2) <= l2).all()
    assert (draws.mean(dim=0) - x).abs().mean() < 0.1, "randomized rounding is unbiased"
    # a bound few draws meet: the rows that keep failing are rounded toward zero, which never grows them
    bound = float(x.norm(dim=1).min()) - 1.0
    tight = skellam.round_records(x, bound, g)
    assert (tight.norm(dim=1) <= bound).all()
    assert (tight == x.trunc()).all(dim=1).any()


def test_shares_add_up_to_a_skellam_of_the_sums_variance():
    variance, t, n = 5000.0, 8, 200_000
    total = sum(skellam.skellam_noise(n, variance / t, seed) for seed in range(t))
    assert total.dtype == np.int64
    assert total.mean() == pytest.approx(0.0, abs=0.5)
    assert total.var() == pytest.approx(variance, rel=0.02)
    # a sum of Skellams is Skellam: the same distribution as one draw of the whole variance
    assert stats.ks_2samp(total[:20_000], skellam.skellam_noise(20_000, variance, 99)).pvalue > 1e-3
