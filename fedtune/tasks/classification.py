"""Classification: label each text (data.text_column -> data.label_column) with one of the run's
labels, through a classification head on the base model's pooled states."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import PeftModel

from fedtune.config import MAX_BATCH_SIZE, DataConfig, FedtuneConfig, LoraConfig, ModelConfig
from fedtune.data.canaries import Canaries
from fedtune.data.federated import FederatedData, Texts, federated_data, label_names, local_data, resolve_data
from fedtune.data.summary import partition_summary
from fedtune.data.text import TokenizedTexts, token_counts, tokenize
from fedtune.errors import ConfigError
from fedtune.models.build import build_model, default_model_dir
from fedtune.models.evaluate import evaluate, example_losses
from fedtune.models.head_init import init_head_from_label_names, linear_head, names_are_words
from fedtune.models.pooling import use_mean_pooling
from fedtune.recipe import (
    BASE_LEARNING_RATE,
    LABELS_FULL_RATIO,
    LABELS_REFERENCE,
    LABELS_STEP_CAP,
    LOCAL_STEP_NOISE,
    RECIPE_RANK,
    RECIPE_ROUNDS,
    Facts,
    labels_factor,
    labels_factor_ceiling,
    local_steps_batch,
    noise_advice,
    noise_rate,
    noise_to_signal,
    plain_recipe,
    recipe_learning_rate,
    recipe_local_steps,
    recipe_sigma,
    sampled_round_steps,
)
from fedtune.tasks.base import Scores, Task

# The largest noise-to-signal ratio r the recipe runs at: its rate BASE_LEARNING_RATE / √(1 + r²) is then
# below 0.03, and the noise on each round's mean update 100 times its signal (the benchmarks' runs: r ≤ 8).
MAX_NOISE_TO_SIGNAL = 100.0

# The options that fix what the private recipe's r counts: its trained values and its one full-batch step.
LAYOUT_KEYS = frozenset({"lora.r", "lora.target_modules", "train.batch_size", "train.local_epochs", "model.pooling",
                         "train.sample_rate"})
# Given by hand, any of these makes a round's steps the user's.
STEP_KEYS = frozenset({"train.batch_size", "train.local_epochs", "train.sample_rate"})


class Classification(Task):
    audit_score = "minus the canary's cross-entropy loss under the final global adapter"

    def default_model(self) -> str:
        return str(default_model_dir())

    def check_config(self, cfg: FedtuneConfig) -> None:
        if cfg.model.head_init == "label-names" and not names_are_words(label_names(cfg.data)):
            raise ConfigError(f"Invalid option `model.head_init`: `label-names` reads the label names as words, and "
                              f"{', '.join(label_names(cfg.data)[:5])} are codes. Use head_init = \"random\", or "
                              "name the labels in the data (e.g. `billing` rather than `3`).")

    def auto_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def check_architecture(self, path: str, config, model: ModelConfig) -> None:
        if model.pooling == "mean":
            use_mean_pooling(self.meta_model(config))
        if model.head_init == "label-names":
            linear_head(self.meta_model(config))

    def private_recipe(self, cfg: FedtuneConfig, facts: Facts, pinned: frozenset[str]) -> dict[str, tuple[Any, str]]:
        """docs/recipe.md: one full-batch SGD step a round on LoRA in the last layer, read by mean pooling."""
        last_layer, hidden = self._last_layer_attention(cfg.model)
        if not last_layer:
            return {}  # not a BERT-style encoder: its rate and layers were never tuned, so only the budget is set
        choices: dict[str, tuple[Any, str]] = {
            "model.pooling": ("mean", "the head reads the mean of the token states, which a sentence encoder "
                                      "was trained to give; a pooler's output is nearly one shared vector"),
            "lora.target_modules": (last_layer, "LoRA in the last layer only: few noised values, and the frozen "
                                                "layers below run once per text (models/prefix_cache.py)"),
            "lora.modules_to_save": ([], "no pooler to train under mean pooling"),
            **({"model.head_init": ("label-names", "each label's head row starts as the model's embedding of the "
                                                   "label's name, so training starts from predicting by meaning; "
                                                   "it reads the run config's label names, no record")}
               if names_are_words(label_names(cfg.data)) else {}),
            "lora.r": (RECIPE_RANK, "rank 2 is enough for one layer, and every trained value is noised"),
            # at the rank the run trains at: a rank given by hand keeps the scale too
            "lora.alpha": ((2.0 * cfg.lora.r, f"scale alpha / r = 2 at the rank given ({cfg.lora.r})")
                           if "lora.r" in pinned else (2.0 * RECIPE_RANK, "scale alpha / r = 2, as at the default "
                                                                          "rank")),
        }
        ratio, sigma, values = self._noise(cfg, facts, pinned, hidden)
        if facts.epsilon and ratio > MAX_NOISE_TO_SIGNAL and "train.learning_rate" not in pinned:
            raise ConfigError(f"Invalid option `dp.target_epsilon`: at ε = {facts.epsilon:g} the noise on a round's "
                              f"mean update would be {ratio:.0f} times its signal (σ {sigma:.1f}, "
                              f"{round(facts.records_per_round)} records a round), so nothing would be learned. Raise "
                              "dp.target_epsilon, or train on more records or institutions; or give "
                              "train.learning_rate by hand to run anyway.")
        t = cfg.dp.distributed_min_honest
        steps, step_noise = self._local_steps(cfg, facts, pinned, values)
        spread, sum_noise = self._step_rounds(cfg, facts, pinned, values, steps)
        one = steps == spread == 1  # one full-batch step per full-batch round, where the labels factor was measured
        # A learning rate given by hand is one for the optimizer it was given with (AdamW's default 3e-3 would
        # barely move plain SGD): the recipe then leaves the optimizer as configured. And an optimizer given by
        # hand other than SGD gets no rate tuned for SGD.
        optimizer = {} if "train.learning_rate" in pinned else {
            "train.optimizer": ("sgd", "plain SGD: AdamW divides each coordinate by a second moment that is mostly "
                                       "noise under DP")}
        rate = {} if "train.optimizer" in pinned and cfg.train.optimizer != "sgd" else {
            "train.learning_rate": (
                recipe_learning_rate(ratio, facts.labels) if one else round(noise_rate(ratio), 2),
                f"{BASE_LEARNING_RATE} / √(1 + r²) x "
                f"{_labels_factor_why(ratio, facts.labels) if one else _NO_FACTOR_WHY}, "
                f"with r = σ√({'m/t' if t else 'm'}·d)/N = {ratio:.2f}, the noise "
                f"on a round's mean update next to its signal (σ {sigma:.2f}, m {facts.clients} institutions a round"
                f"{f', t {t} sharing the noise' if t else ''}, d {values} "
                f"trained values, N {round(facts.records_per_round)} records a "
                f"round)")}
        choices.update({
            **optimizer,
            **(_steps_choices(facts, steps, step_noise) if spread == 1
               else _step_rounds_choices(spread, sum_noise, bool(t))),
            **rate,
            "train.lr_schedule": ("cosine", "decayed towards zero by the last round, so late rounds settle "
                                            "instead of swinging with the noise"),
            "rounds": (RECIPE_ROUNDS * spread, "the noise-to-signal ratio of full-batch DP-SGD does not depend on "
                                               f"the number of steps; {RECIPE_ROUNDS} is where the tuned runs settle"
                                               + (f", and each becomes {spread} rounds of one sampled step"
                                                  if spread > 1 else "")),
        })
        return choices

    def private_advice(self, cfg: FedtuneConfig, facts: Facts, pinned: frozenset[str]) -> tuple[str, ...]:
        """recipe.py::noise_advice for the private recipe's layout, when the recipe sets it."""
        last_layer, hidden = self._last_layer_attention(cfg.model)
        if not last_layer or pinned & LAYOUT_KEYS:
            return ()  # r is the recipe's layout's; a layout given by hand trains other values
        ratio, _, _ = self._noise(cfg, facts, pinned - {"rounds"}, hidden)  # at RECIPE_ROUNDS, where it was measured
        can_share = all(ok for ok, _ in cfg.distributed_dp_needs())  # what --secagg would then allow
        return noise_advice(facts, ratio, cfg.dp.distributed_min_honest, can_share, cfg.dp.unit)

    def _noise(self, cfg: FedtuneConfig, facts: Facts, pinned: frozenset[str], hidden: int) -> tuple[float, float, int]:
        """(r, σ, d) under the private recipe's one full-batch step a round: recipe.py::noise_to_signal of its
        σ and trained values."""
        rounds = _rounds_per_client(cfg, facts, pinned)
        sigma = recipe_sigma(facts, rounds, 1, cfg.dp.accounting) if facts.epsilon else cfg.dp.noise_multiplier
        # trained values: LoRA's A and B on two projections of the last layer, and the head
        values = 2 * RECIPE_RANK * 2 * hidden + (hidden + 1) * facts.labels
        return noise_to_signal(facts, sigma, values, cfg.dp.distributed_min_honest), sigma, values

    def _local_steps(self, cfg: FedtuneConfig, facts: Facts, pinned: frozenset[str], values: int) -> tuple[int, float]:
        """(k, step noise): recipe.py::recipe_local_steps, or one full-batch step where a round must be one:
        under distributed DP (each share must be of one plain-SGD step on every record), a white-box audit's
        public streams (every record in every step), or a σ given by hand (k steps would spend another ε).
        (1, 0.0) too where the batch or the epochs were given: the run's steps are then the user's."""
        if cfg.dp.distributed_min_honest or cfg.dp.public_streams or not facts.epsilon:
            return 1, 0.0
        if STEP_KEYS & pinned:
            return 1, 0.0
        return recipe_local_steps(facts, _rounds_per_client(cfg, facts, pinned), values)

    def _step_rounds(self, cfg: FedtuneConfig, facts: Facts, pinned: frozenset[str], values: int,
                     local_steps: int) -> tuple[int, float]:
        """A federation under DP: (k, the step noise of the round's sum), recipe.py::sampled_round_steps: k
        rounds of one Poisson step at rate 1/k for each full-batch round. Under distributed DP always (each
        share must be of one step); otherwise where the local-steps rule gave one step (a federation of large
        institutions keeps its local steps, which need no more rounds). (1, 0.0) for one holder (local steps
        are the same steps without more rounds), with public streams (every record in every step), and where
        the rounds or the steps were given, or σ was (k rounds would spend another ε)."""
        t = cfg.dp.distributed_min_honest
        if facts.clients < 2 or cfg.dp.public_streams or not facts.epsilon or ({"rounds"} | STEP_KEYS) & pinned:
            return 1, 0.0
        if not t and local_steps > 1:
            return 1, 0.0
        return sampled_round_steps(facts, _rounds_per_client(cfg, facts, pinned), values, t)

    def plain_recipe(self, cfg: FedtuneConfig, facts: Facts) -> dict[str, tuple[Any, str]]:
        """docs/recipe.md: small enough batches for several local steps, and (a federation) up to 40 rounds."""
        return plain_recipe(cfg, facts)

    def _last_layer_attention(self, model: ModelConfig) -> tuple[list[str], int]:
        """The query and value projections of a BERT-style encoder's last layer, when mean pooling suits the
        model, and its hidden size; ([], 0) otherwise (the recipe then sets the budget only)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.model_path(model))
            meta = self.meta_model(config)
            use_mean_pooling(meta)
        except (OSError, ValueError, ConfigError):
            return [], 0  # preflight's check_model then names the problem with the model, if there is one
        last = getattr(config, "num_hidden_layers", 0) - 1
        suffixes = [name[name.index(f"layer.{last}."):] for name, module in meta.named_modules()
                    if isinstance(module, torch.nn.Linear) and f".layer.{last}." in name
                    and name.rsplit(".", 1)[-1] in ("query", "value")]
        return (sorted(suffixes), config.hidden_size) if len(suffixes) == 2 else ([], 0)

    def build_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        return build_model(model, lora, num_labels=len(label_names(data)), seed=seed)

    def initial_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        built = super().initial_model(model, lora, data, seed)
        if model.head_init == "label-names":  # public: the run config's label names, no record
            init_head_from_label_names(built, list(label_names(data)), self.tokenizer(model), model.max_length)
        return built

    def fresh_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        labels = label_names(data)
        fresh = build_model.__wrapped__(model, lora, num_labels=len(labels), seed=seed, cache_prefix=False)
        fresh.config.id2label = dict(enumerate(labels))  # an exported model names its labels
        fresh.config.label2id = {name: i for i, name in enumerate(labels)}
        return fresh

    def resolve_data(self, data: DataConfig) -> DataConfig:
        return resolve_data(data)

    def federation(self, data: DataConfig, num_clients: int, seed: int) -> FederatedData:
        return federated_data(data, num_clients, seed)

    def own_records(self, data: DataConfig, secret: str) -> tuple[Texts, Texts, tuple[str, ...]]:
        return local_data(data, secret)

    def tokenize(self, tokenizer, records: Texts, max_length: int) -> TokenizedTexts:
        texts, labels = records
        return tokenize(tokenizer, texts, labels, max_length)

    def canary_records(self, canaries: Canaries) -> Texts:
        texts, labels = zip(*canaries.records, strict=True)
        return list(texts), list(labels)

    def summary(self, fed: FederatedData, data: DataConfig, tokenizer, max_length: int) -> dict[str, Any]:
        return partition_summary(fed, data, token_counts(tokenizer, fed.texts, max_length), max_length)

    def evaluate(self, model: torch.nn.Module, dataset: TokenizedTexts) -> Scores:
        return Scores(*evaluate(model, dataset))

    def example_losses(self, model: torch.nn.Module, dataset: TokenizedTexts) -> list[float]:
        return example_losses(model, dataset)


TASK = Classification()


def _rounds_per_client(cfg: FedtuneConfig, facts: Facts, pinned: frozenset[str]) -> int:
    """The rounds each institution trains in, at the recipe's rounds unless given (as rounds_per_client())."""
    rounds = cfg.rounds if "rounds" in pinned else RECIPE_ROUNDS
    return max(1, math.ceil(rounds * facts.clients / cfg.clients - 1e-9))


def _steps_choices(facts: Facts, steps: int, step_noise: float) -> dict[str, tuple[Any, str]]:
    """The batch and epochs of the recipe's k local steps a round (docs/recipe.md, "Local steps")."""
    if steps == 1:
        every = f"every record in every step (Poisson q = 1, up to {MAX_BATCH_SIZE:,} records)"
        return {"train.batch_size": (MAX_BATCH_SIZE, f"{every}: the least noise per record for a given ε"),
                "train.local_epochs": (1, "one step a round: several steps on a non-IID shard fit its own label "
                                          f"prior{_one_step_why(step_noise)}")}
    batch = local_steps_batch(facts, steps)
    return {"train.batch_size": (batch, f"{steps} DP-SGD steps a round on Poisson samples of about 1/{steps} of the "
                                        f"smallest institution's {min(facts.records)} records (σ solved for them: the "
                                        f"same ε): each step's noise is {step_noise:.2f} C, below the largest signal "
                                        f"clipping lets through ({LOCAL_STEP_NOISE:g} C), where one full-batch step a "
                                        "round runs out of steps"),
            "train.local_epochs": (1, f"one pass over the records a round, in {steps} or more steps")}


def _step_rounds_choices(spread: int, sum_noise: float, shared: bool) -> dict[str, tuple[Any, str]]:
    """A federation's k rounds of one sampled step (docs/recipe.md, "Sampled rounds")."""
    why_one = ("each institution's share must be of one step" if shared else
               "the server averages after every step, so no institution drifts from the global model on its "
               "own few records")
    return {"train.sample_rate": (1 / spread, f"each round one DP-SGD step on a Poisson sample of 1/{spread} of "
                                              f"every institution's records, {spread} rounds in place of one "
                                              f"full-batch round (σ solved for them: the same ε): the step of the "
                                              f"round's sum has noise {sum_noise:.2f} C, below the largest signal "
                                              f"clipping lets through ({LOCAL_STEP_NOISE:g} C), where full-batch "
                                              "rounds run out of steps"),
            "train.local_epochs": (1, f"one sampled step a round: {why_one}")}


def _one_step_why(step_noise: float) -> str:
    if not step_noise:
        return ""
    return ("; and the smallest institution's records are too few for several: two steps a round would each carry "
            f"more noise than the largest signal clipping lets through ({LOCAL_STEP_NOISE:g} C)")


_NO_FACTOR_WHY = "1 (several steps per full-batch round move the model further than one; the labels factor " \
                 "was measured only for one)"


def _labels_factor_why(ratio: float, labels: int) -> str:
    """The labels factor of recipe_learning_rate, and what set it."""
    factor = labels_factor(noise_rate(ratio), ratio, labels)
    if labels <= LABELS_REFERENCE:
        return f"1 ({labels} labels: the rate was tuned on {LABELS_REFERENCE})"
    if factor >= (labels / LABELS_REFERENCE) ** 0.5 - 1e-9:
        return f"{factor:.2f} = √({labels}/{LABELS_REFERENCE}): more labels, less signal per record"
    ceiling = labels_factor_ceiling(ratio)
    if factor <= 1.0 and ceiling <= 1.0:
        return f"1, not √({labels}/{LABELS_REFERENCE}): the noise is small (r < {LABELS_FULL_RATIO / 2:.3g}), " \
               "where a raised rate collapsed"
    if factor >= ceiling - 1e-9:
        return f"{factor:.2f}, not √({labels}/{LABELS_REFERENCE}): at most {ceiling:.2f} at this noise"
    if factor > 1.0:
        return f"{factor:.2f}, not √({labels}/{LABELS_REFERENCE}): held to a step of {LABELS_STEP_CAP} C"
    return f"1, not √({labels}/{LABELS_REFERENCE}): the step is already {LABELS_STEP_CAP} C or longer"
