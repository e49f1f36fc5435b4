"""Distributed DP's integer shares through SecAgg+: Flower's quantizer maps an encoded share exactly onto
its integers, the coordinator decodes the exact integer sum, and an institution's DP-SGD step produces an
integer share whose noise is Skellam of the share's variance."""

import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedtune.privacy.distributed import CLIPPING_RANGE as R
from fedtune.privacy.distributed import decode_sum, encode, grid_step, quantization_range

Q = 2**27


def _through_secagg(shares: list[np.ndarray], q: int) -> np.ndarray:
    """What SecAggPlusWorkflow hands back for weight-1 submissions: Flower's quantizer on each encoded share,
    the modular sum, dequantization with one −r offset per extra participant, divided by their number."""
    quantized = [quantize([encode(v, q)], R, q)[0].astype(np.int64) for v in shares]
    total = np.sum(quantized, axis=0) % 2**32
    return (dequantize([total], R, q)[0] - (len(shares) - 1) * R) / len(shares)


def test_flowers_quantizer_maps_an_encoded_share_exactly_onto_its_integers():
    share = np.random.default_rng(0).integers(-(Q // 2) + 1, Q // 2, size=5000)
    for _ in range(3):  # Flower's stochastic rounding never moves an exact grid value
        assert (quantize([encode(share, Q)], R, Q)[0] == np.mod(share, Q)).all()


@pytest.mark.parametrize("m", [2, 5, 20])
def test_the_coordinator_decodes_the_exact_integer_sum(m):
    rng = np.random.default_rng(m)
    q = quantization_range(m)
    shares = [rng.integers(-(10**6), 10**6, size=3000) for _ in range(m)]
    np.testing.assert_array_equal(decode_sum(_through_secagg(shares, q), m, q), np.sum(shares, axis=0))


def test_a_sum_beyond_half_the_range_wraps_modulo_q():
    """Wrapping is a function of the sum alone (post-processing): a utility failure, never a privacy one."""
    q = quantization_range(2)
    shares = [np.array([q // 4 + 1]), np.array([q // 4])]
    assert decode_sum(_through_secagg(shares, q), 2, q)[0] == q // 2 + 1 - q


def test_ranges_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        grid_step(3.0, Q)


def test_an_institutions_step_is_an_integer_share_with_skellam_noise_of_the_share_variance(tiny_model, tokenized):
    """dp.distributed_min_honest = 4: K = Σ rounded records + Skellam noise of skellam.share_variance; the
    same seed rounds the same way, so K(σ) − K(0) is the noise alone; the model steps on K/γ."""
    from fedtune.config import DPConfig
    from fedtune.privacy import skellam
    from tests.privacy.test_dpsgd import _subset

    data = _subset(tokenized, 4)
    quiet, _ = _integer_step(tiny_model, data, DPConfig(noise_multiplier=0.0, distributed_min_honest=4))
    share, grads = _integer_step(tiny_model, data, DPConfig(noise_multiplier=1.0, distributed_min_honest=4))
    dim = sum(v.size for v in share.values)
    noise = np.concatenate([(s - z).ravel() for s, z in zip(share.values, quiet.values, strict=True)])
    assert all(v.dtype == np.int64 for v in share.values)
    assert noise.var() == pytest.approx(skellam.share_variance(1.0, dim, 4), rel=0.1)
    assert share.variance == skellam.share_variance(1.0, dim, 4)
    for value, grad in zip(share.values, grads, strict=True):
        torch.testing.assert_close(grad, torch.from_numpy(value / share.scale).to(grad.dtype))
    # Σ of 4 records, each rounded to norm ≤ Δ₂: the quiet share's norm is at most 4·Δ₂
    assert np.sqrt(sum((z.astype(np.float64) ** 2).sum() for z in quiet.values)) <= 4 * share.l2


def test_an_empty_poisson_batch_still_submits_a_noise_share(tiny_model, tokenized):
    """At q < 1 a step can sample no record: the share is then noise alone, and the step still counts."""
    from fedtune.config import DPConfig
    from fedtune.data.text import pad_batch
    from fedtune.privacy.dpsgd import RoundSeeds, make_private, step_on_empty_batch

    params = [p for p in tiny_model.parameters() if p.requires_grad]
    private = make_private(tiny_model, torch.optim.SGD(params, lr=0.1), tokenized, len(tokenized), pad_batch,
                           DPConfig(noise_multiplier=1.0, distributed_min_honest=4), [], RoundSeeds.derived(1),
                           sample_rate=0.5)
    try:
        step_on_empty_batch(private.optimizer)
    finally:
        private.close()
    share = private.integer_share
    assert len(share.values) == len(params) and np.concatenate([v.ravel() for v in share.values]).std() > 0
    assert private.history == [(1.0, 0.5, 1)]


def _integer_step(model, data, dp):
    from fedtune.data.text import pad_batch
    from fedtune.privacy.dpsgd import RoundSeeds, make_private

    params = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(params, lr=0.1), data, len(data), pad_batch, dp, [],
                           RoundSeeds.derived(5))
    try:
        loss = model(**pad_batch([data[i] for i in range(len(data))])).loss
        loss.backward()
        private.upcast_grad_samples()
        private.optimizer.pre_step()  # clip -> round -> accumulate -> add the share's noise -> scale
        grads = [p.grad.clone() * private.optimizer.expected_batch_size for p in params]  # undo Opacus' mean
        private.optimizer.zero_grad(set_to_none=True)
    finally:
        private.close()
    return private.integer_share, grads


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


def test_a_noise_only_share_is_fresh_skellam_noise_of_a_trained_shares_variance():
    """An institution that did not train submits Skellam noise of the same variance as a trained share's, drawn
    afresh (a review: a stub stood in for the noise itself, so a share of zeros, which removes one of the t noise
    shares the others count on, went unseen). The real share as it is encoded for SecAgg+, decoded."""
    from flwr.app import Array, ArrayRecord

    from fedtune.client import app as client_app
    from fedtune.config import FedtuneConfig
    from fedtune.privacy import skellam

    cfg = FedtuneConfig.from_flat({"clients": 4, "dp.secagg": True, "dp.distributed_min_honest": 4,
                                   "dp.noise_multiplier": 1.5, "train.optimizer": "sgd"})
    q = quantization_range(4)
    start = ArrayRecord({"a": Array(np.zeros((300, 400), np.float32)), "b": Array(np.zeros(40_000, np.float32))})
    shares = [client_app._noise_share(start, cfg, q) for _ in range(2)]
    # one submitter's encoded share is the mean SecAgg+ hands back for it (exact: the quantizer tests above)
    decoded = [np.concatenate([decode_sum(share[n].numpy(), 1, q).ravel() for n in ("a", "b")]) for share in shares]
    expected = skellam.share_variance(1.5, 160_000, 4)
    for noise in decoded:
        assert abs(noise.mean()) < 5 * math.sqrt(expected / noise.size)
        assert noise.var() == pytest.approx(expected, rel=0.02)
    assert not np.array_equal(decoded[0], decoded[1]), "each share is drawn afresh"


@pytest.mark.parametrize("m", [1, 2, 3, 7, 20, 31, 32, 100])
def test_the_modular_sum_of_m_extreme_shares_never_wraps_around_flowers_modulus(m):
    """quantization_range(m) keeps SecAgg+'s modular sum of m values in [0, Q) below 2^32, so the sum of the
    shares' residues comes back exact, not wrapped around Flower's modulus."""
    q = quantization_range(m)
    assert m * q < 2**32
    for edge in (q // 2 - 1, -(q // 2)):
        shares = [np.full(4, edge) for _ in range(m)]
        expected = (m * edge + q // 2) % q - q // 2
        np.testing.assert_array_equal(decode_sum(_through_secagg(shares, q), m, q), np.full(4, expected))
