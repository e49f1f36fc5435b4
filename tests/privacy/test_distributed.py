"""Distributed DP's grid and noise share: Flower's SecAgg+ quantizer maps the grid exactly onto
integers, and the error left after the dither is taken out is uniform and independent of the data."""

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from scipy import stats

from fedtune.privacy.distributed import dither, grid_step, to_grid, undither_sum

R, Q = 2.0**24, 2**27


def test_flowers_quantizer_maps_the_grid_exactly_onto_integers():
    values = np.random.default_rng(0).normal(0, 1e4, size=5000)
    d = dither(1, 2, 3, values.shape)
    grid = to_grid(values, d, R, Q)
    k = np.floor((values + R) / grid_step(R, Q) + d + 0.5)
    for _ in range(3):  # Flower's stochastic rounding never moves an exact grid value
        assert (quantize([grid], R, Q)[0] == k).all()


def test_the_sum_through_flowers_quantizer_is_the_data_sum_plus_bounded_dither_error():
    rng = np.random.default_rng(1)
    shares = [rng.normal(0, 1e3, size=2000) for _ in range(5)]
    dithers = [dither(7, 1, node, shares[0].shape) for node in range(5)]
    quantized = [quantize([to_grid(v, d, R, Q)], R, Q)[0].astype(np.int64)
                 for v, d in zip(shares, dithers, strict=True)]
    total = np.sum(quantized, axis=0) % 2**32  # SecAgg+'s modular sum
    # dequantized as SecAggPlusWorkflow does: one offset of -r per extra participant
    grid_sum = dequantize([total], R, Q)[0] - (len(shares) - 1) * R
    recovered = undither_sum(grid_sum, dithers, R, Q)
    s = grid_step(R, Q)
    assert np.abs(recovered - np.sum(shares, axis=0)).max() <= len(shares) * s / 2 + 1e-9


def test_the_error_is_uniform_and_independent_of_the_value():
    s = grid_step(R, Q)
    n = 20_000
    errors = {}
    for value in (0.0, 0.3 * s, 1e4 + 0.77 * s):  # values at different places between grid points
        v = np.full(n, value)
        d = dither(3, 1, 0, (n,))
        errors[value] = (to_grid(v, d, R, Q) - s * d) - v
    for e in errors.values():
        assert np.abs(e).max() <= s / 2 + 1e-9
        assert stats.kstest(e / s + 0.5, "uniform").pvalue > 1e-3
    a, b, c = errors.values()
    assert stats.ks_2samp(a, b).pvalue > 1e-3 and stats.ks_2samp(a, c).pvalue > 1e-3


def test_without_the_dither_the_error_depends_on_the_value():
    """What the dither is for: plain rounding leaves the same error for the same value every time."""
    s = grid_step(R, Q)
    v = np.full(1000, 0.3 * s)
    plain = to_grid(v, np.zeros_like(v), R, Q) - v
    assert np.allclose(plain, -0.3 * s)


def test_ranges_must_be_powers_of_two_and_values_inside():
    with pytest.raises(ValueError, match="power of two"):
        grid_step(3.0, Q)
    with pytest.raises(ValueError, match="outside the grid"):
        to_grid(np.array([R]), np.zeros(1), R, Q)


def test_an_institution_adds_its_share_of_the_noise_and_records_the_sums_sigma(tiny_model, tokenized):
    """dp.distributed_min_honest = 4: the same draw, half the std (1/√4); the accountant records σ."""
    from fedtune.config import DPConfig
    from tests.privacy.test_dpsgd import _private_grads, _subset

    data = _subset(tokenized, 4)
    _, quiet = _private_grads(tiny_model, data, DPConfig(noise_multiplier=0.0), 0)
    _, whole = _private_grads(tiny_model, data, DPConfig(noise_multiplier=1.0), 5)
    _, share = _private_grads(tiny_model, data, DPConfig(noise_multiplier=1.0, distributed_min_honest=4), 5)
    for w, s, q in zip(whole, share, quiet, strict=True):
        torch.testing.assert_close(s - q, 0.5 * (w - q), atol=1e-6, rtol=1e-4)


def test_the_history_records_the_sums_sigma(tiny_model, tokenized, tiny_cfg):
    import dataclasses

    from fedtune.client.train import train_round
    from fedtune.config import DPConfig, TrainConfig

    cfg = dataclasses.replace(tiny_cfg, clients=4, dp=DPConfig(noise_multiplier=2.0, distributed_min_honest=4,
                                                               secagg=True),
                              train=TrainConfig(batch_size=len(tokenized), optimizer="sgd"))
    result = train_round(tiny_model, tokenized, cfg, [], proximal_mu=0.0, seed=0)
    assert result.history == [(2.0, 1.0, 1)]


def test_an_institution_shares_its_noise_only_as_far_as_its_own_node_config_allows():
    from fedtune import constants as k
    from fedtune.config import FedtuneConfig
    from fedtune.privacy.policy import node_policy

    cfg = FedtuneConfig().with_overrides({"clients": 8, "dp.secagg": True, "dp.distributed_min_honest": 4})
    institution = {k.DATA_PATH: "own.csv", k.NODE_STATE_DIR: "/secure", k.NODE_CLIENT_NAME: "clinic-a"}
    assert "`max-noise-sharers` is 0" in node_policy(institution, cfg, "").refusal(cfg.dp, 100)
    trusting = node_policy({**institution, k.NODE_MAX_NOISE_SHARERS: 4}, cfg, "")
    assert trusting.refusal(cfg.dp, 100) is None
    more = cfg.with_overrides({"dp.distributed_min_honest": 5}).dp
    assert "`max-noise-sharers` is 4" in trusting.refusal(more, 100)
    simulated = node_policy({k.PARTITION_ID: 0, k.NUM_PARTITIONS: 8}, cfg, "/run/state")  # the run's own data
    assert simulated.refusal(cfg.dp, 100) is None


def test_a_noise_only_share_has_the_scale_of_a_trained_share(monkeypatch):
    """A trained share is n·Δ = −(lr/q)·(Σ clipped gradients + its noise), q = train.sample_rate (1 for a
    full-batch step); an institution that did not train submits noise of the same scale, lr·σC/(q·√t)."""
    from flwr.app import ArrayRecord

    from fedtune.client import app as client_app
    from fedtune.config import FedtuneConfig
    from fedtune.privacy import distributed

    stds = []
    monkeypatch.setattr(distributed, "noise_only_share", lambda shapes, std, *rest: stds.append(std) or [])
    for rate in (0.0, 0.25):
        cfg = FedtuneConfig.from_flat({"clients": 4, "dp.secagg": True, "dp.distributed_min_honest": 4,
                                       "dp.noise_multiplier": 1.5, "dp.max_grad_norm": 0.5, "train.optimizer": "sgd",
                                       "train.learning_rate": 2.0, "train.sample_rate": rate})
        client_app._noise_share(ArrayRecord({}), cfg, 1, 7, 2**20)
    assert stds == pytest.approx([2.0 * 1.5 * 0.5 / 2, 2.0 * 1.5 * 0.5 / (0.25 * 2)])


@pytest.mark.parametrize("m", [1, 2, 3, 7, 20, 31, 32, 100])
def test_the_modular_sum_of_m_extreme_shares_never_wraps(m):
    """quantization_range(m) keeps SecAgg+'s modular sum of m values at the edges of ±r below 2^32,
    so the sum comes back exact, not wrapped around the modulus."""
    from fedtune.privacy.distributed import quantization_range

    q = quantization_range(m)
    s = grid_step(R, q)
    assert m * q < 2**32
    for edge in (R - s, -R + s):
        shares = [np.full(4, edge) for _ in range(m)]
        quantized = [quantize([to_grid(v, np.zeros(4), R, q)], R, q)[0].astype(np.int64) for v in shares]
        total = np.sum(quantized, axis=0) % 2**32
        grid_sum = dequantize([total], R, q)[0] - (m - 1) * R
        np.testing.assert_allclose(grid_sum, m * edge, rtol=0, atol=m * s / 2)
