"""Distributed DP over SecAgg+ (issue #19; docs/privacy.md): the exact, dithered grid on which each
institution hands its noised share to Flower's SecAgg+.

Why a grid of our own. Flower's `secaggplus_mod` quantizes each value x to (x + r)·Q/(2r) with
stochastic rounding from numpy's global generator, and the server dequantizes the modular sum. The
rounding error then depends on x, and a sum of such errors is not post-processing of the Gaussian sum
that distributed DP's analysis covers. So each institution rounds first, on a grid that Flower's
quantizer maps exactly onto integers:

- r and Q are powers of two, so the step s = 2r/Q is one too, and a value s·k − r (k an integer below
  2^53) is exact in float64. Flower's (x + r)·Q/(2r) is then exactly k, and its stochastic rounding
  changes nothing. Submitted with weight 1, Flower multiplies by nothing before quantizing.
- The rounding is subtractively dithered: k = ⌊(x + r)/s + D + 1/2⌋ with D uniform on [−1/2, 1/2)
  per coordinate, drawn from a generator keyed by (run seed, round, node id), which the server
  rebuilds and subtracts. By Schuchman's theorem (1964) the error that remains,
  s·k − r − s·D − x, is uniform on [−s/2, s/2) and independent of x, over D's draw. For whoever does
  not know D, the sum the server recovers is the sum of the x plus noise that does not depend on
  anyone's data: post-processing. The server itself knows D, and given D each error is a fixed
  function of its own x: against the server this step is not post-processing of the Gaussian sum,
  and no bound on it is derived (docs/privacy.md, "Not proven against the coordinator").
- A dither shared by all institutions would not do: their errors would then depend jointly on
  their inputs. Each draws its own.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from fedtune.config import TrainConfig

DITHER_TAG = b"fedtune-ddp-dither"


def grid_step(clipping_range: float, quantization_range: int) -> float:
    """s = 2r/Q, refused unless both are powers of two (otherwise Flower's quantizer is not exact)."""
    for name, value in (("clipping_range", clipping_range), ("quantization_range", quantization_range)):
        mantissa, _ = np.frexp(value)
        if value <= 0 or mantissa != 0.5:
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    return 2 * clipping_range / quantization_range


def dither(seed: int, round_: int, node_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """The public dither D ~ U[−1/2, 1/2)^shape of one institution in one round."""
    key = hashlib.sha256(DITHER_TAG + f"{seed}:{round_}:{node_id}".encode()).digest()
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(key[:16], "little")))
    return rng.random(shape) - 0.5


def to_grid(values: np.ndarray, d: np.ndarray, clipping_range: float, quantization_range: int) -> np.ndarray:
    """The float64 values s·k − r that Flower quantizes exactly to k; refuses values outside ±r."""
    s = grid_step(clipping_range, quantization_range)
    values = np.asarray(values, dtype=np.float64)
    if np.abs(values).max(initial=0.0) > clipping_range - s:
        raise ValueError(f"a value of magnitude {np.abs(values).max():.3g} is outside the grid's range "
                         f"±{clipping_range}")
    k = np.floor((values + clipping_range) / s + d + 0.5)
    return k * s - clipping_range


def undither_sum(grid_sum: np.ndarray, dithers: list[np.ndarray], clipping_range: float,
                 quantization_range: int) -> np.ndarray:
    """Σ x + (uniform errors independent of the x): the grid values' sum with every dither taken out."""
    s = grid_step(clipping_range, quantization_range)
    return grid_sum - s * np.sum(dithers, axis=0)


# SecAgg+'s range for distributed DP: values n_i·Δ_i = −lr·(Σ clipped gradients + noise share) fit in
# ±2^24 for any realistic lr·C·n; quantization_range keeps the sum below 2^32, and at Q = 2^27 the grid
# step s = 2^-2 leaves an error of std s/√12 ≈ 0.07 per institution and value, next to a
# noise share of std lr·σC/√t (about 2 under the private recipe). Q = 2^27 for up to 31 institutions.
CLIPPING_RANGE = 2.0**24
MODULUS_BITS = 32


def quantization_range(institutions: int) -> int:
    """Q = 2^(32 − ⌈log2(m + 1)⌉): the largest power of two with m·Q < 2^32, so that the sum of m values
    in [0, Q] (and of Flower's m weights, each Q) never wraps around the modulus."""
    return 2 ** (MODULUS_BITS - math.ceil(math.log2(institutions + 1)))


def flat_dither(seed: int, round_: int, node_id: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """One institution's dither for all its arrays, drawn as one vector so that no two values share a draw."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = dither(seed, round_, node_id, (sum(sizes),))
    return [part.reshape(shape) for part, shape in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes, strict=True)]


def share_of_sum(start: list[np.ndarray], end: list[np.ndarray], records: int, seed: int, round_: int,
                 node_id: int, q: int) -> list[np.ndarray]:
    """A trained institution's share: n_i·(θ_end − θ_start) = −lr·(Σ clip_C(g) + its noise share),
    on the dithered grid of SecAgg+'s quantization range `q`, in float64."""
    values = [records * (e.astype(np.float64) - s.astype(np.float64)) for s, e in zip(start, end, strict=True)]
    return _on_grid(values, seed, round_, node_id, q)


def noise_only_share(shapes: list[tuple[int, ...]], std: float, seed: int, round_: int, node_id: int,
                     q: int) -> list[np.ndarray]:
    """An institution that did not train still adds its noise share (std lr·σC/√t), from the OS's
    secure randomness, so that every submitter's share is in the sum the others rely on."""
    import secrets

    rng = np.random.Generator(np.random.Philox(key=secrets.randbits(128)))
    return _on_grid([rng.normal(0.0, std, shape) for shape in shapes], seed, round_, node_id, q)


def _on_grid(values: list[np.ndarray], seed: int, round_: int, node_id: int, q: int) -> list[np.ndarray]:
    dithers = flat_dither(seed, round_, node_id, [v.shape for v in values])
    return [to_grid(v, d, CLIPPING_RANGE, q) for v, d in zip(values, dithers, strict=True)]


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
