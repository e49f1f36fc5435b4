"""The recipe: the options a user left alone are chosen for their data and federation.

fedtune's option defaults (AdamW, LoRA in every layer, batch 128, 3 rounds) suit one holder of all
the records without DP. Under DP they stall at the class prior, and in a federation of small
institutions they take one step a round (docs/recipe.md). With `recipe.mode = "auto"` (the
default), a run that starts resolves every option it was not given from rules that read only what
the server may know when the run starts: the task and base model, the number of labels, of clients
and of each client's training records (as the partition reports them), ε and δ. Options given by
hand, in a config file, on the command line or in `flwr run --run-config`, are kept. config.toml
records the chosen values, and `recipe.chosen` says why each was chosen.

Two rule sets: the private recipe under DP-SGD (the privacy budget here, what a task trains by in
Task.private_recipe), and the plain recipe without DP (Task.plain_recipe; the classifier's is
plain_recipe here: batch size and rounds for a federation). Each rule, and the runs it was chosen on,
is in docs/recipe.md.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

from fedtune.config import MAX_BATCH_SIZE, FedtuneConfig

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

    @property
    def records_per_round(self) -> float:
        """A round's expected records: the institutions' total times the share of them sampled a round."""
        return sum(self.records) * self.clients / max(len(self.records), 1)


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
    if cfg.recipe.mode == "off":
        return cfg
    pinned = pinned_by_value(cfg) if pinned is None else pinned
    if not cfg.dp.enabled:
        plain = {key: choice for key, choice in get_task(cfg.model.task).plain_recipe(cfg, facts_of(cfg)).items()
                 if key not in pinned}
        if not cfg.early_stopping_patience and "early_stopping_patience" in pinned:
            plain.pop("cooldown_rounds", None)  # the cooldown follows the patience, turned off by hand
        return _chosen(_with(cfg, plain), plain)
    choices: dict[str, Choice] = {}
    if not {"dp.target_epsilon", "dp.noise_multiplier"} & pinned:
        target = min(DEFAULT_TARGET_EPSILON, cfg.dp.epsilon_budget)
        choices["dp.target_epsilon"] = (target, "no σ or ε given: every institution spends at most ε = 8, the "
                                        "operating point most DP fine-tuning of language models reports (or the "
                                        "budget, if lower)")
    cfg = _with(cfg, choices)
    facts = facts_of(cfg)
    task = get_task(cfg.model.task)
    task_choices = {key: choice for key, choice in task.private_recipe(cfg, facts, pinned).items()
                    if key not in pinned}
    advice = task.private_advice(cfg, facts, pinned)
    cfg = _chosen(_with(cfg, task_choices), {**choices, **task_choices})
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, advice=advice))


def _chosen(cfg: FedtuneConfig, choices: dict[str, Choice]) -> FedtuneConfig:
    """`cfg` with recipe.chosen saying what was chosen and why."""
    notes = tuple(f"{key} = {_shown(value)}: {why}" for key, (value, why) in choices.items())
    # never empty once applied, so a later resolution (the ServerApp's, which can only tell given options
    # by their values) keeps what was given here instead of choosing again
    notes = notes or ("nothing: every option the recipe sets was given, or it sets none for this task",)
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


def noise_to_signal(facts: Facts, sigma: float, trained_values: int, min_honest: int = 0) -> float:
    """How large the noise on a round's aggregated update is next to its signal.

    Each institution takes one full-batch step: the sum of its n_i clipped per-record gradients (norm at
    most C each) plus Gaussian noise of std σC per trained value, divided by n_i. FedAvg weighs it by
    n_i / N, so the round's update is (Σ clipped gradients + Σ_i noise_i) / N: a mean of norm at most C
    plus noise of norm about σC·√(m·d) / N (m institutions, d trained values, N records). The ratio of
    the two, σ·√(m·d) / N, is what a learning rate must respect. When m of M institutions train each
    round, N is a round's expected records: the M institutions' total times m / M. Under distributed DP
    (`min_honest` = t) each adds σ/√t, so the sum's noise is σC·√(m/t·d) / N: σ·√(d)/N when t = m."""
    shares = facts.clients / min_honest if min_honest else facts.clients
    return sigma * (shares * trained_values) ** 0.5 / max(facts.records_per_round, 1.0)


def recipe_learning_rate(ratio: float, labels: int = 0) -> float:
    """BASE_LEARNING_RATE, shrunk as the noise grows, then raised for a task with more labels than
    PhraseBank's, within labels_factor()'s limits.

    A step's length is about lr·C·√(s² + r²) (signal and noise are orthogonal), with s the mean clipped
    gradient's norm in units of C. The first factor, BASE_LEARNING_RATE / √(1 + r²), takes s = 1 and
    keeps that length where the tuned runs had it. Measured, s falls as about SIGNAL_SQRT_LABELS /
    √labels (bench/signal_norm.py), so at that rate a set with more labels moves along its signal
    √(labels / 3) times less a round than PhraseBank, where the rate was tuned. labels_factor() gives it
    that much more rate, but never a step longer than LABELS_STEP_CAP, never more than twice, and
    not at all where the noise is small (central or distributed DP), where a raised rate collapsed
    BANKING77; never less than the first factor. docs/recipe.md has the runs."""
    rate = noise_rate(ratio)
    return round(rate * labels_factor(rate, ratio, labels), 2)


# Above this noise-to-signal ratio the noise on a round's mean update is larger than the largest signal
# clipping lets through (a mean of norm C; the measured one is smaller, see SIGNAL_SQRT_LABELS), and a run
# is told so (noise_advice). Measured at ε = 8 (docs/benchmarks.md, "Ninth session"): at r ≤ 0.73
# federated DP ended within 1.1 points of central DP's one full-batch step a round on three sets (within 7.5 of
# central DP with local steps); at r = 1.86 (banking24) 11.4 below the first.
NOISY_RATIO = 1.0


def noise_advice(facts: Facts, ratio: float, min_honest: int = 0, can_share: bool = True,
                 unit: str = "record") -> tuple[str, ...]:
    """What a run whose noise-to-signal ratio is above NOISY_RATIO should know, and what would lower it;
    nothing below. It changes no option: only the user can trade budget or trust for accuracy.

    `ratio` is r over RECIPE_ROUNDS rounds, where the threshold was measured, whatever rounds the run
    has: the σ that spends ε over T full-batch steps grows about as √T, so r does too, while the noise
    summed over the run next to the summed signal does not change (see RECIPE_ROUNDS). `can_share`: whether
    the run's other options allow distributed DP (config.py::_check_distributed_dp); `unit`: dp.unit."""
    if ratio <= NOISY_RATIO:
        return ()
    m = facts.clients
    records = sum(facts.records)  # every institution's, sampled or not
    over = f" over {RECIPE_ROUNDS} rounds" if facts.epsilon else ""  # a σ given by hand does not follow the rounds
    notes = [f"r = {ratio:.2f}{over}: the noise on a round's mean update is larger than the largest "
             "signal clipping lets through. On every set measured, accuracy fell further as r grew past 1 "
             "(docs/recipe.md, \"When the noise is larger than the signal\")."]
    if m >= 2 and not min_honest:
        share = (" or distributed DP over SecAgg+ (--secagg --distributed-min-honest t), which divides r by √t if "
                 "at least t institutions a round add their share of the noise honestly "
                 f"({_shared_ratios(ratio, m)}; docs/privacy.md)") if can_share else ""
        notes.append(
            f"Each of the {m} institutions a round adds the noise its own ε needs: √{m} = {m**0.5:.1f} times what "
            f"one holder of all {records} {unit}s would add. Measured at ε = 8 where r ≤ 0.73, federated DP ended "
            "within 1.1 points of one holder of all the records taking the same one full-batch step a round, and "
            "within 7.5 of central DP with its local steps; at r = 1.86, 11.4 below the first. To lower r: a larger "
            f"budget per institution, fewer and larger institutions{',' if share else ''}{share}.")
    else:
        notes.append(f"To lower r: a larger budget, or more {unit}s per holder.")
    return tuple(notes)


def _shared_ratios(ratio: float, m: int) -> str:
    """r under distributed DP with every institution's share, and with half of them (t ≥ 2)."""
    shown = [f"r = {ratio / m**0.5:.2f} at t = {m}"]
    if m // 2 >= 2:
        shown.append(f"{ratio / (m // 2) ** 0.5:.2f} at t = {m // 2}")
    return ", ".join(shown)


def noise_rate(ratio: float) -> float:
    """The first factor: BASE_LEARNING_RATE / √(1 + r²), the rate before the labels factor."""
    return BASE_LEARNING_RATE / (1.0 + ratio**2) ** 0.5


# s·√labels, measured at round 0 on the validation splits: 0.36 (PhraseBank), 0.28 (Medical Abstracts),
# 0.46 (BANKING77); bench/results/signal_norm.json. Only the step-length cap reads it.
SIGNAL_SQRT_LABELS = 0.36
LABELS_REFERENCE = 3  # PhraseBank's labels, where BASE_LEARNING_RATE was tuned
# Two limits on the labels factor, one for each way a run was seen to fail (ε = 8, seed 0; docs/recipe.md).
# The noise: the longest step, in units of C, it may lead to. Federated, BANKING77 gained 3.9 points at a
# step of 2.5 and collapsed at 5.0; PhraseBank lost 3.1 at 4.4.
LABELS_STEP_CAP = 2.5
# The rate itself. Where the noise is small the step is short, yet a raised rate collapsed BANKING77 twice:
# central DP at ×5.07 (r = 0.08) within 2 rounds, distributed DP at ×2 (r = 0.08) at round 7, where it
# was stable through 30 rounds at r = 0.37 to 0.67. So the factor's ceiling grows with the noise: none
# up to r = LABELS_FULL_RATIO / 2, LABELS_MAX_FACTOR from r = LABELS_FULL_RATIO, linear between.
LABELS_MAX_FACTOR = 2.0
LABELS_FULL_RATIO = 0.37  # the least noise the factor of 2 was measured stable at (BANKING77, 20 institutions)


def labels_factor(rate: float, ratio: float, labels: int) -> float:
    """How much to raise `rate` for `labels` labels: √(labels / 3), at most labels_factor_ceiling(ratio)
    and held to a step of LABELS_STEP_CAP; 1 for 3 labels or fewer, where the noise is small, or where
    the step at `rate` is already that long."""
    if labels <= LABELS_REFERENCE:
        return 1.0
    step = rate * ((SIGNAL_SQRT_LABELS**2 / labels) + ratio**2) ** 0.5
    return max(1.0, min((labels / LABELS_REFERENCE) ** 0.5, labels_factor_ceiling(ratio), LABELS_STEP_CAP / step))


def labels_factor_ceiling(ratio: float) -> float:
    """LABELS_MAX_FACTOR where the noise on a round's update is at least LABELS_FULL_RATIO of its scale,
    falling linearly to 1 at half that, and 1 below."""
    return min(LABELS_MAX_FACTOR, max(1.0, LABELS_MAX_FACTOR * ratio / LABELS_FULL_RATIO))


def recipe_sigma(facts: Facts, rounds: int, local_steps: int = 1, accountant: str = "prv") -> float:
    """The σ each institution will solve for, spending facts.epsilon: `local_steps` steps a round on Poisson
    samples of rate 1 / local_steps (1: one full-batch step, q = 1). It is budget.py's solver on the
    schedule budget.py::poisson_schedule gives a client whose batch is its records / local_steps, so the
    recipe plans with the σ the clients then use: under the default accountant, PRV, or under distributed
    DP the Skellam shares' (`skellam`: the sampled Gaussian's RDP at integer orders, a little above PRV)."""
    from fedtune.privacy.budget import solve_noise_multiplier  # imports Opacus; keep `fedtune --help` light

    return solve_noise_multiplier(facts.epsilon, facts.delta, 1.0 / local_steps, rounds * local_steps, accountant)


# Local DP-SGD steps a round. One full-batch step a round runs out of steps where the noise is small: on
# TREC, central DP (r = 0.08) ended 28 points below central without DP, its curve still climbing when the
# cosine decay ended it (docs/benchmarks.md, "Thirteenth session"). k steps on Poisson samples of rate
# 1/k, σ solved for them (the same ε), lifted one holder of every record by 9 to 21 points at k = 4 in
# bench/dp_emulator.py (TREC, PhraseBank, banking24), where each step's noise was 0.16 to 0.93 C
# (local_step_noise). Where each institution's was 9.5 C (PhraseBank, 20 institutions) nothing was gained,
# and at 18.6 C (banking24) the federation collapsed. So a run takes several local steps only while the
# smallest institution's step noise stays below the largest signal clipping lets through, C.
LOCAL_STEP_NOISE = 1.0
MAX_LOCAL_STEPS = 4  # the most measured


def local_step_noise(sigma: float, local_steps: int, trained_values: int, records: int) -> float:
    """The noise on one local step's mean gradient, in units of C: σC·√d over the expected batch n/k."""
    return sigma * local_steps * trained_values**0.5 / max(records, 1)


def recipe_local_steps(facts: Facts, rounds: int, trained_values: int) -> tuple[int, float]:
    """(k, its step noise at the smallest institution): the most steps a round, a power of two up to
    MAX_LOCAL_STEPS, whose step noise there is at most LOCAL_STEP_NOISE; k = 1 where none is (one
    full-batch step, whose noise the server's average then divides among the institutions)."""
    return _most_steps(facts, rounds, trained_values, min(facts.records, default=1), 1.0)


def sampled_round_steps(facts: Facts, rounds: int, trained_values: int, min_honest: int = 0) -> tuple[int, float]:
    """A federation: (k, the step noise of the round's sum). k steps become k rounds, each one Poisson step at
    rate 1/k (train.sample_rate) at every institution, with σ solved for rounds·k steps (the same ε). FedAvg
    weighs each institution's step by n_i / N, so the round's update is one DP-SGD step over all N records at
    rate 1/k (the union of the institutions' Poisson samples is a Poisson sample of every record) whose noise
    is the sum of the institutions': σ√m with each adding its own (`min_honest` 0), σ√(m/t) under distributed
    DP. The rule is recipe_local_steps' on that step: most steps whose noise, σ√(m/t)·k·√d / N in units of
    C, stays at most LOCAL_STEP_NOISE. Unlike local steps, no institution moves away from the global model
    between averages, so its own few records do not set k (docs/recipe.md, "Sampled rounds")."""
    shares = facts.clients / min_honest if min_honest else facts.clients
    return _most_steps(facts, rounds, trained_values, max(round(facts.records_per_round), 1), shares**0.5,
                       "skellam" if min_honest else "prv")


def _most_steps(facts: Facts, rounds: int, trained_values: int, records: int, scale: float,
                accountant: str = "prv") -> tuple[int, float]:
    """The most steps k (1, 2, 4 ... MAX_LOCAL_STEPS, at most `records`) whose step noise over `records`,
    times `scale`, is at most LOCAL_STEP_NOISE, with that noise; (1, its noise) where none is."""
    chosen = (1, scale * local_step_noise(recipe_sigma(facts, rounds, 1, accountant), 1, trained_values, records))
    k = 2
    while k <= MAX_LOCAL_STEPS and k <= records:
        noise = scale * local_step_noise(recipe_sigma(facts, rounds, k, accountant), k, trained_values, records)
        if noise > LOCAL_STEP_NOISE:
            break
        chosen, k = (k, noise), 2 * k
    return chosen


def local_steps_batch(facts: Facts, local_steps: int) -> int:
    """The batch that gives the smallest institution `local_steps` Poisson steps a round (up to 4,096
    records; 4,096 for one step: every record in it). A larger institution takes more steps, each with
    less noise, as its own σ is solved for its own rate and steps."""
    if local_steps == 1:
        return MAX_BATCH_SIZE
    return min(MAX_BATCH_SIZE, math.ceil(min(facts.records) / local_steps))


# The recipe without DP. Measured on PhraseBank's validation split, 20 institutions (median 51 training
# records; docs/recipe.md): at the default batch of 128 each takes one step a round, and 3 rounds reach
# 0.64 where one holder of every record reaches 0.94.
PLAIN_STEPS_PER_EPOCH = 10  # local steps an epoch for the median institution, at least
PLAIN_MIN_BATCH, PLAIN_MAX_BATCH = 8, 128  # the default batch is the most; 8, the least measured, the least
PLAIN_FEDERATED_ROUNDS = 40  # at most (BANKING77 needed more than 20); early stopping ends a run that has settled
PLAIN_PATIENCE = 5
PLAIN_COOLDOWN = 5  # rounds of a falling rate after the patience runs out (server/schedule.py)


def plain_batch_size(records: tuple[int, ...]) -> int:
    """The largest power of two that gives the median institution PLAIN_STEPS_PER_EPOCH steps an epoch,
    within [PLAIN_MIN_BATCH, PLAIN_MAX_BATCH]."""
    median = statistics.median(records) if records else 0
    batch = 2 ** max(0, math.floor(math.log2(max(median / PLAIN_STEPS_PER_EPOCH, 1))))
    return min(PLAIN_MAX_BATCH, max(PLAIN_MIN_BATCH, batch))


def plain_recipe(cfg: FedtuneConfig, facts: Facts) -> dict[str, Choice]:
    """Without DP: enough local steps a round for every institution, and, in a federation, enough rounds
    for averaging to catch up with one holder of every record (docs/recipe.md)."""
    batch = plain_batch_size(facts.records)
    median = statistics.median(facts.records) if facts.records else 0
    choices: dict[str, Choice] = {
        "train.batch_size": (batch, f"about {PLAIN_STEPS_PER_EPOCH} local steps an epoch for the median "
                                    f"institution ({median:g} records), between {PLAIN_MIN_BATCH} and "
                                    f"{PLAIN_MAX_BATCH}: a federation of small institutions otherwise takes "
                                    "one step a round"),
    }
    if len(facts.records) > 1:
        choices["rounds"] = (PLAIN_FEDERATED_ROUNDS, "averaging updates trained on non-IID shards needs more "
                                                     "rounds than one holder of every record needs epochs")
        choices["train.lr_schedule"] = ("cosine", "decayed towards zero by the last round, so the late "
                                                  "rounds settle")
        if cfg.clients_evaluating() and cfg.data.client_val_fraction and cfg.dp.client_dp == "off":
            choices["early_stopping_patience"] = (
                PLAIN_PATIENCE, f"stop once the clients' validation loss has not improved for {PLAIN_PATIENCE} "
                                f"rounds: some data sets overfit long before {PLAIN_FEDERATED_ROUNDS} rounds")
            choices["cooldown_rounds"] = (
                PLAIN_COOLDOWN, f"before that stop, {PLAIN_COOLDOWN} rounds whose learning rate falls towards "
                                "zero, so the final adapter is a settled one, not the last full-rate round's")
    return choices
