"""Canary clients: the audit of client-level DP (Andrew et al. 2024, "One-shot Empirical Privacy
Estimation for Federated Learning", ICLR; arXiv 2302.03098).

`dp.canary_clients` = k institutions that hold no data. Canary j owns a direction c_j drawn
uniformly from the unit sphere of the adapter's weights. It joins the population with probability
1/2 (the one-run audit's coin, privacy/audit.py); a member is then sampled into each round's cohort
like any institution, by its own coin flip with q = m/N, and its update is the largest that
client-level DP lets through: C·c_j, C the round's clipping norm. A non-member's direction is drawn
but never used. After training, the auditor scores every canary by the cosine between c_j and what
training released (server/audit.py): a member's cosine is pushed up by its updates, a non-member's
is the cosine of a random direction, about N(0, 1/d).

The canaries' updates are added to the sum of clipped updates inside ZeroFilledMean, under the DP
wrapper's noise: the same mechanism as if k more institutions had sent exactly C·c_j (clipping a
vector of norm C leaves it as it is). Under adaptive clipping they count as unclipped, which is
what a norm-C update is to Flower (clipped means norm > C), and the count's denominator is m either
way. Real institutions' updates and ε are untouched; the model moves by at most C·√(members)/m per
round along directions orthogonal to everything else in high dimension.

Everything follows from the run's seed through streams of its own, so the server, which scores
the canaries after training, knows every direction and membership, and a resumed run continues
with the same canaries. The DP noise is drawn elsewhere (Flower's wrappers), independently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

MEMBERS_STREAM, COHORT_STREAM, DIRECTION_STREAM = 0xC1A0, 0xC1A1, 0xC1A2  # tags: one stream each, per seed


@dataclass(frozen=True)
class CanaryClients:
    count: int  # k canary institutions
    seed: int
    sample_rate: float  # q = m / N, as for every institution

    @cached_property
    def members(self) -> tuple[bool, ...]:
        """Which canaries joined the population: each by a fair coin, independently."""
        rng = np.random.default_rng((self.seed, MEMBERS_STREAM))
        return tuple(bool(b) for b in rng.random(self.count) < 0.5)

    def cohort(self, server_round: int) -> list[int]:
        """The member canaries that train in `server_round`: each by its own coin flip with q."""
        rng = np.random.default_rng((self.seed, COHORT_STREAM, server_round))
        sampled = rng.random(self.count) < self.sample_rate
        return [j for j, (member, chosen) in enumerate(zip(self.members, sampled, strict=True)) if member and chosen]

    def direction(self, j: int, size: int) -> np.ndarray:
        """c_j: a uniformly random unit vector of `size` float64s (a normalized Gaussian)."""
        vector = np.random.default_rng((self.seed, DIRECTION_STREAM, j)).standard_normal(size)
        return vector / np.linalg.norm(vector)

    def directions(self, size: int) -> Iterator[np.ndarray]:
        """c_0 .. c_{k-1}, one at a time (k of them may not fit in memory together)."""
        return (self.direction(j, size) for j in range(self.count))

    def round_sum(self, server_round: int, shapes: Sequence[tuple[int, ...]], clipping_norm: float) -> list[np.ndarray]:
        """The sum of this round's canary updates C·c_j, split into arrays of `shapes` (the global
        arrays in the order of `flat_order`)."""
        size = sum(int(np.prod(shape)) for shape in shapes)
        total = np.zeros(size)
        for j in self.cohort(server_round):
            total += clipping_norm * self.direction(j, size)
        return unflatten(total, shapes)


def flat_order(names: Sequence[str]) -> list[int]:
    """The positions of the global arrays in the order their weights are laid out in a canary's
    direction: sorted by name, so the strategy and the auditor agree whatever order a record has."""
    return sorted(range(len(names)), key=lambda i: names[i])


def unflatten(vector: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(vector[start:start + size].reshape(shape))
        start += size
    return out
