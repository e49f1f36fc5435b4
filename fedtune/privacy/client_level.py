"""Client-level DP accounting: the ε of the noised aggregate, for one institution as a whole.

The mechanism (Flower's DP strategy wrappers, composed in strategies/client_dp.py) releases,
each round, the sum of the cohort's clipped updates (L2 norm <= C) divided by m, the expected
cohort size, plus Gaussian noise of std z*C/m: a Gaussian mechanism with noise multiplier z on
the sum, whose sensitivity is C when one institution's contribution is replaced by nothing
(add/remove or zero-out neighbouring, Kairouz et al. 2021). Each institution joins each round
by its own coin flip with probability q = m / N (strategies/cohort.py): Poisson sampling, which
is what the analysis assumes. R such releases compose. ε comes from Opacus' RDP accountant for
the Poisson-subsampled Gaussian, the same analysis (and library) as the sample-level ε.

Pure functions and one small record; nothing here knows about Flower.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from opacus.accountants import RDPAccountant

ACCOUNTANT = "rdp"


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after `rounds` releases of a q-subsampled Gaussian with multiplier z; inf without noise."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0.0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(accountant.get_epsilon(delta=delta))


def combined_noise_multiplier(update_noise: float, count_noise: float) -> float:
    """One Gaussian equivalent to adaptive clipping's two releases (Andrew et al. 2021, Thm 1):
    the update sum with multiplier sigma_u (sensitivity C) and the clipped-count with std
    sigma_b. Flower counts clipped updates as 0/1 bits, so the count's sensitivity is 1 (the
    paper centres the bits to get 1/2; we do not assume it): z = (sigma_u^-2 + sigma_b^-2)^-1/2."""
    if update_noise <= 0.0 or count_noise <= 0.0:
        return 0.0
    return (update_noise ** -2 + count_noise ** -2) ** -0.5


def adaptive_noise_inputs(noise_multiplier: float, num_sampled: int) -> tuple[float, float]:
    """(noise_multiplier, clipped_count_stddev) to hand Flower's adaptive wrapper so that the
    mechanism it runs is worth exactly `noise_multiplier` by combined_noise_multiplier().

    The count noise is Andrew et al.'s m/20, but at least 2z: with small cohorts m/20 is far
    too little (Flower refuses z >= m/10). Flower derives the update noise from its input z_in
    as sigma_u = (z_in^-2 - (2 sigma_b)^-2)^-1/2; we pick z_in so that sigma_u^-2 + sigma_b^-2 = z^-2."""
    count_noise = max(num_sampled / 20, 2 * noise_multiplier)
    if noise_multiplier <= 0.0:
        return 0.0, count_noise
    z_in = (noise_multiplier ** -2 - count_noise ** -2 + (2 * count_noise) ** -2) ** -0.5
    return z_in, count_noise


@dataclass(frozen=True)
class ClientLevelAccount:
    """What the ledger's `client_level` entry says after `rounds` releases."""

    clipping: Literal["fixed", "adaptive"]
    side: Literal["server", "client"]
    noise_multiplier: float  # the z that is accounted (for adaptive: combined_noise_multiplier)
    clipping_norm: float  # the current norm (adaptive clipping moves it every round)
    sample_rate: float
    rounds: int  # noised releases so far
    delta: float

    @property
    def epsilon(self) -> float:
        return client_level_epsilon(self.noise_multiplier, self.sample_rate, self.rounds, self.delta)

    def to_dict(self) -> dict[str, Any]:
        eps = self.epsilon
        sampling = "poisson" if self.sample_rate < 1 else "every institution, every round"
        return {**asdict(self), "epsilon": None if math.isinf(eps) else eps, "accountant": ACCOUNTANT,
                "sampling": sampling}

