"""Distributed DP over SecAgg+ (issue #19; docs/privacy.md): how each institution's integer share
(privacy/skellam.py, built in its DP-SGD step by privacy/dpsgd.py::IntegerShare) travels through Flower's
SecAgg+, and how the coordinator reads the sum back.

Flower's `secaggplus_mod` maps a value x to (x + r)·Q/(2r), rounds it stochastically, adds masks modulo
2^32 and dequantizes the sum. A share K is already an integer, so it is sent as the float64 value
s·(K mod Q) − r, with s = 2r/Q: r and Q are powers of two, so s is one too and the value is exact. Flower
then maps it exactly to K mod Q, and its stochastic rounding changes nothing. No rounding happens after
the noise: the coordinator learns Σ K mod Q, a function of the sum alone, so whatever it knows, the
Skellam mechanism's analysis covers what it sees. Read in [−Q/2, Q/2), that is Σ K itself while
|Σ K| < Q/2; a sum beyond it wraps (a utility failure, never a privacy one: wrapping is post-processing),
and the coordinator warns when a round's sum uses half of that range (RANGE_WARNING).
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.config import TrainConfig


def grid_step(clipping_range: float, quantization_range: int) -> float:
    """s = 2r/Q, refused unless both are powers of two (otherwise Flower's quantizer is not exact)."""
    for name, value in (("clipping_range", clipping_range), ("quantization_range", quantization_range)):
        mantissa, _ = np.frexp(value)
        if value <= 0 or mantissa != 0.5:
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    return 2 * clipping_range / quantization_range


# SecAgg+'s range for distributed DP: a share's integers k = K mod Q lie in [0, Q) and are sent as s·k − r,
# in [−r, r). quantization_range keeps the sum of m such values (and Flower's m weights, each Q) below 2^32.
CLIPPING_RANGE = 2.0**24
MODULUS_BITS = 32


def quantization_range(institutions: int) -> int:
    """Q = 2^(32 − ⌈log2(m + 1)⌉): the largest power of two with m·Q < 2^32, so that the sum of m values
    in [0, Q] (and of Flower's m weights, each Q) never wraps around the modulus."""
    return 2 ** (MODULUS_BITS - math.ceil(math.log2(institutions + 1)))


def encode(share: np.ndarray, q: int) -> np.ndarray:
    """An integer share K as the float64 values s·(K mod Q) − r, which Flower quantizes exactly to K mod Q."""
    s = grid_step(CLIPPING_RANGE, q)
    return np.mod(np.asarray(share, dtype=np.int64), q).astype(np.float64) * s - CLIPPING_RANGE


def decode_sum(mean: np.ndarray, submitters: int, q: int) -> np.ndarray:
    """Σ K (int64, read in [−Q/2, Q/2)) from the mean SecAgg+ hands back over `submitters` encoded shares:
    Flower's mean is (s·Σk − m·r)/m, so Σk = m·(mean + r)/s, and Σ K ≡ Σk (mod Q)."""
    s = grid_step(CLIPPING_RANGE, q)
    total = np.rint(submitters * (np.asarray(mean, dtype=np.float64) + CLIPPING_RANGE) / s).astype(np.int64)
    return np.mod(total + q // 2, q) - q // 2


# Past |Σ K| = Q/2 the decoded sum wraps (module docstring). The coordinator warns when a round's sum uses at
# least this share of that range, so a run nearing it is seen before a wrapped round corrupts the model.
# Reading the decoded sum is post-processing of what SecAgg+ releases, so the check costs no privacy.
RANGE_WARNING = 0.5


def range_used(sums: list[np.ndarray], q: int) -> float:
    """The largest |Σ K| over a round's decoded sums, as a fraction of Q/2."""
    return max((float(np.max(np.abs(s), initial=0)) for s in sums), default=0.0) / (q // 2)


def noise_only_share(shapes: list[tuple[int, ...]], variance: float) -> list[np.ndarray]:
    """The share of an institution that did not train: Skellam noise of the share's variance alone, from
    the OS's secure randomness, so that every submitter's noise is in the sum the others rely on."""
    import secrets

    from fedtune.privacy.skellam import skellam_noise

    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = skellam_noise(sum(sizes), variance, secrets.randbits(128))
    return [part.reshape(shape) for part, shape in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes, strict=True)]


def share_variance(sigma: float, shapes: list[tuple[int, ...]], min_honest: int) -> float:
    """The Skellam variance each of t institutions adds (skellam.share_variance), for an adapter of these shapes."""
    from fedtune.privacy import skellam

    return skellam.share_variance(sigma, sum(int(np.prod(shape)) for shape in shapes), min_honest)


def step_scale(learning_rate: float, sample_rate: float, max_grad_norm: float) -> float:
    """The factor that turns Σ K into Σ n_i·Δ_i: each institution's one SGD step is θ − lr·(K/γ)/(q·n_i)
    (Opacus' mean over the expected batch q·n_i, with q = 1 for a full batch), so n_i·Δ_i = −lr·K/(q·γ)."""
    from fedtune.privacy.skellam import SCALE

    return -learning_rate / ((sample_rate or 1.0) * SCALE / max_grad_norm)


def not_one_sgd_step(train: TrainConfig, n: int) -> str:
    """Why a round of `train` on n records would not be one plain-SGD step, or "". The sum carries σ only
    if each institution's share is of one step: on every record, or (train.sample_rate) on a Poisson
    sample at the rate every institution uses (docs/privacy.md). The server's preflight checks it for the
    largest institution, and each institution for what it is actually asked."""
    from fedtune.privacy.budget import poisson_schedule

    if poisson_schedule(n, train.batch_size, 1, train.sample_rate)[1] != 1:
        return (f"{n} records at train.batch_size {train.batch_size} take several; raise it to at least {n}, "
                "or set train.sample_rate")
    if train.local_epochs != 1:
        return f"train.local_epochs is {train.local_epochs}; it must be 1"
    if train.optimizer != "sgd":
        return f"train.optimizer is {train.optimizer}; it must be sgd"
    return ""
