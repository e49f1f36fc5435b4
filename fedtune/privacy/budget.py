"""The per-client ε budget: a client trains a round only if its ε after that round stays within budget."""

from __future__ import annotations

import math

from fedtune.config import DPConfig
from fedtune.privacy.accountant import History, epsilon


def poisson_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, steps) that Opacus' Poisson loader gives one round of local training:
    one step per batch of the equivalent fixed-size loader, q = 1 / batches per epoch."""
    batches = math.ceil(num_examples / min(batch_size, num_examples))
    return 1.0 / batches, batches * epochs


def projected_epsilon(dp: DPConfig, history: History, num_examples: int, batch_size: int,
                      epochs: int) -> float:
    """ε the client would have spent after training one more round."""
    q, steps = poisson_schedule(num_examples, batch_size, epochs)
    return epsilon(dp.accountant, [*history, (dp.noise_multiplier, q, steps)], dp.delta)


def within_budget(dp: DPConfig, history: History, num_examples: int, batch_size: int, epochs: int) -> bool:
    if math.isinf(dp.epsilon_budget):
        return True
    return projected_epsilon(dp, history, num_examples, batch_size, epochs) <= dp.epsilon_budget
