"""The per-client ε budget: the noise a client uses, and whether its next round stays within budget."""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

from opacus.accountants.utils import get_noise_multiplier

from fedtune.config import DPConfig
from fedtune.errors import ConfigError
from fedtune.privacy.accountant import History, epsilon


def poisson_schedule(num_examples: int, batch_size: int, epochs: int, sample_rate: float = 0.0) -> tuple[float, int]:
    """(sample rate q, steps) of one round of local training: one step per batch of the equivalent
    fixed-size loader, q = 1 / batches per epoch, as Opacus' Poisson loader gives; or, with a
    `sample_rate` (train.sample_rate), one step at that rate whatever the number of records."""
    if sample_rate:
        return sample_rate, 1
    batches = math.ceil(num_examples / min(batch_size, num_examples))
    return 1.0 / batches, batches * epochs


@lru_cache(maxsize=1024)
def solve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                           accountant: str) -> float:
    """Smallest sigma (to Opacus' tolerance) whose ε after `steps` Poisson steps is <= target."""
    if accountant == "skellam":
        from fedtune.privacy import skellam

        return skellam.solve_sigma(target_epsilon, delta, sample_rate, steps)
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.005))
    except ValueError as err:  # Opacus: "The privacy budget is too low." (no σ it searches reaches the target)
        raise ConfigError(f"Invalid option `dp.target_epsilon`: no noise multiplier reaches ε = {target_epsilon:g} at "
                          f"δ = {delta:g} over {steps} step{'s' if steps != 1 else ''} at q = {sample_rate:.3g} "
                          f"({err}). Raise dp.target_epsilon (1 to 10 is usual).") from None


def client_dp(dp: DPConfig, solved: float | None, num_examples: int, batch_size: int, epochs: int,
              rounds: int, sample_rate: float = 0.0) -> DPConfig:
    """The DP settings this client trains with. With a target ε, sigma is solved so that training
    in every one of the planned `rounds` spends exactly the target (or reuses the sigma solved
    at the client's first round), and the target also caps the budget: a run extended past its
    plan makes the client decline rather than overspend."""
    if dp.target_epsilon <= 0:
        return dp
    if solved is None:
        q, steps = poisson_schedule(num_examples, batch_size, epochs, sample_rate)
        solved = solve_noise_multiplier(dp.target_epsilon, dp.delta, q, steps * rounds, dp.accounting)
    return _with_sigma(dp, solved)


def share_dp(dp: DPConfig, rounds: int, sample_rate: float = 0.0) -> DPConfig:
    """The DP settings of an institution's share under distributed DP: with a target ε, the σ of one
    step a round at the run's q (train.sample_rate, or 1: a full-batch step) over `rounds`, whatever
    the institution's own records, batch or epochs. The sum carries σ only if every share is of it,
    and that includes the noise-only share of an institution refused for not taking that one step,
    whose own schedule (several steps) would give a smaller σ."""
    if dp.target_epsilon <= 0:
        return dp
    return _with_sigma(dp, solve_noise_multiplier(dp.target_epsilon, dp.delta, sample_rate or 1.0, rounds,
                                                  dp.accounting))


def _with_sigma(dp: DPConfig, sigma: float) -> DPConfig:
    return dataclasses.replace(dp, noise_multiplier=sigma, epsilon_budget=min(dp.epsilon_budget, dp.target_epsilon))


def projected_epsilon(dp: DPConfig, history: History, num_examples: int, batch_size: int,
                      epochs: int, sample_rate: float = 0.0) -> float:
    """ε the client would have spent after training one more round."""
    q, steps = poisson_schedule(num_examples, batch_size, epochs, sample_rate)
    return epsilon(dp.accounting, [*history, (dp.noise_multiplier, q, steps)], dp.delta)


def within_budget(dp: DPConfig, history: History, num_examples: int, batch_size: int, epochs: int,
                  sample_rate: float = 0.0) -> bool:
    if math.isinf(dp.epsilon_budget):
        return True
    return projected_epsilon(dp, history, num_examples, batch_size, epochs, sample_rate) <= dp.epsilon_budget
