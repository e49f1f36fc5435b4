"""The private recipe: under DP-SGD, the options a user left alone are chosen for their data.

fedtune's plain defaults (AdamW, LoRA in every layer, 3 rounds) learn without DP and stall at the
class prior under it (docs/recipe.md). With `recipe.mode = "auto"` (the default) and DP on, a run
that starts resolves every option it was not given from rules that read only what the server may
know when the run starts: the task and base model, the number of labels, of clients and of each
client's training records (as the partition reports them), ε and δ. Options given by hand, in a
config file, on the command line or in `flwr run --run-config`, are kept. config.toml records the
chosen values, and `recipe.chosen` says why each was chosen.

The rules common to every task live here (the privacy budget); what a task trains by is its own
(Task.private_recipe). Each rule, and the runs it was chosen on, is in docs/recipe.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fedtune.config import FedtuneConfig

# ε = 8 per institution, δ = the run's: the operating point that DP fine-tuning of language models
# reports most (Li et al. 2022, "Large Language Models Can Be Strong Differentially Private Learners",
# ε ∈ {3, 8}; Yu et al. 2022, "Differentially Private Fine-tuning of Language Models", ε ≈ 6.7-8),
# and inside the "ε ≤ 10" tier that Ponomareva et al. 2023, "How to DP-fy ML" (JAIR), call
# reasonable for a deployed model. Measured on three real sets in docs/recipe.md.
DEFAULT_TARGET_EPSILON = 8.0

Choice = tuple[Any, str]  # (value, why)


@dataclass(frozen=True)
class Facts:
    """What the server may know when a run starts; every field is in the run's partition summary."""

    labels: int  # 0 for a task without labels
    clients: int  # institutions sampled per round
    records: tuple[int, ...]  # each institution's training records (users, under dp.unit `user`)
    epsilon: float  # the target ε each institution spends over the run
    delta: float


def pinned_by_value(cfg: FedtuneConfig) -> frozenset[str]:
    """The options that differ from fedtune's defaults: what a user must have set, when the entry point
    (`flwr run`, whose run config lists every option) cannot tell what was given by hand."""
    defaults = FedtuneConfig().to_flat()
    return frozenset(key for key, value in cfg.to_flat().items() if value != defaults[key])


def apply_recipe(cfg: FedtuneConfig, pinned: frozenset[str] | None, facts_of) -> FedtuneConfig:
    """`cfg` with the recipe's choices for every option not in `pinned` (None: pinned_by_value), and
    recipe.chosen saying why. `facts_of(cfg)` gives the Facts of a config (it reads the partition)."""
    from fedtune.tasks.base import get_task

    if cfg.recipe.chosen:
        return cfg  # chosen once, when the run was first resolved: its values are now the config's own
    if cfg.recipe.mode == "off" or not cfg.dp.enabled:
        return cfg
    pinned = pinned_by_value(cfg) if pinned is None else pinned
    choices: dict[str, Choice] = {}
    if not {"dp.target_epsilon", "dp.noise_multiplier"} & pinned:
        target = min(DEFAULT_TARGET_EPSILON, cfg.dp.epsilon_budget)
        choices["dp.target_epsilon"] = (target, "no σ or ε given: every institution spends at most ε = 8, the "
                                        "operating point most DP fine-tuning of language models reports (or the "
                                        "budget, if lower)")
    cfg = _with(cfg, choices)
    facts = facts_of(cfg)
    task_choices = {key: choice for key, choice in get_task(cfg.model.task).private_recipe(cfg, facts, pinned).items()
                    if key not in pinned}
    cfg = _with(cfg, task_choices)
    notes = tuple(f"{key} = {_shown(value)}: {why}" for key, (value, why) in {**choices, **task_choices}.items())
    # never empty once applied, so a later resolution (the ServerApp's, which can only tell given options
    # by their values) keeps what was given here instead of choosing again
    notes = notes or ("nothing: every option the recipe sets was given",)
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, chosen=notes))


def _with(cfg: FedtuneConfig, choices: dict[str, Choice]) -> FedtuneConfig:
    return cfg.with_overrides({key: value for key, (value, _) in choices.items()}) if choices else cfg


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


# The rounds of the private recipe. In full-batch DP-GD the noise accumulated over T steps grows as
# √T x σ(T) ∝ T, as fast as the signal, so T does not change the noise-to-signal ratio; it sets how
# far the model can travel and how long the run takes. 30 is where the runs in docs/recipe.md settle.
RECIPE_ROUNDS = 30
RECIPE_RANK = 2  # LoRA's rank in the last layer: every trained value is noised, so few of them
# The SGD rate when the noise on a round's mean update is small next to its signal (see
# noise_to_signal): lr 3 at PhraseBank's r = 0.73 (docs/benchmarks.md), i.e. 3 x √(1 + 0.73²). How
# far it was checked on the validation splits of the other sets is in docs/recipe.md.
BASE_LEARNING_RATE = 3.6


def noise_to_signal(facts: Facts, sigma: float, trained_values: int) -> float:
    """How large the noise on a round's aggregated update is next to its signal.

    Each institution takes one full-batch step: the sum of its n_i clipped per-record gradients (norm at
    most C each) plus Gaussian noise of std σC per trained value, divided by n_i. FedAvg weighs it by
    n_i / N, so the round's update is (Σ clipped gradients + Σ_i noise_i) / N: a mean of norm at most C
    plus noise of norm about σC·√(m·d) / N (m institutions, d trained values, N records). The ratio of
    the two, σ·√(m·d) / N, is what a learning rate must respect. When m of M institutions train each
    round, N is a round's expected records: the M institutions' total times m / M."""
    records = sum(facts.records) * facts.clients / max(len(facts.records), 1)
    return sigma * (facts.clients * trained_values) ** 0.5 / max(records, 1.0)


def recipe_learning_rate(ratio: float) -> float:
    """BASE_LEARNING_RATE, shrunk as the noise grows: a step's length is about lr·√(1 + ratio²) (signal
    and noise are orthogonal), so this keeps it where the tuned runs had it."""
    return round(BASE_LEARNING_RATE / (1.0 + ratio**2) ** 0.5, 2)


def recipe_sigma(facts: Facts, rounds: int) -> float:
    """The σ each institution will solve for: full-batch steps (q = 1), one a round, spending facts.epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=facts.epsilon, target_delta=facts.delta, sample_rate=1.0,
                                steps=rounds, accountant="prv")
