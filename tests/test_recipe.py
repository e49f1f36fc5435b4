"""The recipe: what the user left alone is chosen for the data (under DP and without), and why is recorded."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from fedtune.config import DataConfig, FedtuneConfig, given_keys
from fedtune.recipe import (
    BASE_LEARNING_RATE,
    DEFAULT_TARGET_EPSILON,
    LABELS_FULL_RATIO,
    LABELS_MAX_FACTOR,
    LABELS_REFERENCE,
    LABELS_STEP_CAP,
    LOCAL_STEP_NOISE,
    MAX_LOCAL_STEPS,
    NOISY_RATIO,
    PLAIN_COOLDOWN,
    PLAIN_FEDERATED_ROUNDS,
    PLAIN_MIN_BATCH,
    PLAIN_PATIENCE,
    SIGNAL_SQRT_LABELS,
    Facts,
    apply_recipe,
    labels_factor,
    labels_factor_ceiling,
    local_step_noise,
    local_steps_batch,
    noise_advice,
    noise_to_signal,
    plain_batch_size,
    recipe_learning_rate,
    recipe_local_steps,
    recipe_sigma,
    sampled_round_steps,
)
from fedtune.server.prepare import facts, resolve

CFG = FedtuneConfig(clients=4, data=DataConfig(demo_examples=200))
GIVEN = frozenset({"clients", "data.demo_examples"})


def _chosen_keys(cfg: FedtuneConfig) -> list[str]:
    return [note.split(" = ", 1)[0] for note in cfg.recipe.chosen]


def test_a_default_dp_run_gets_a_budget_and_the_last_layer_recipe_with_reasons():
    cfg = resolve(CFG, GIVEN)
    assert cfg.dp.target_epsilon == DEFAULT_TARGET_EPSILON  # no default run spends an unbounded ε
    assert cfg.model.pooling == "mean" and cfg.lora.r == 2 and cfg.lora.modules_to_save == ()
    assert cfg.lora.target_modules == ("layer.5.attention.self.query", "layer.5.attention.self.value")
    assert (cfg.train.optimizer, cfg.train.batch_size, cfg.train.local_epochs) == ("sgd", 4096, 1)
    assert set(_chosen_keys(cfg)) >= {"dp.target_epsilon", "train.learning_rate", "rounds", "model.pooling",
                                      "model.head_init"}
    assert cfg.model.head_init == "label-names"  # the demo's labels are words: self-care, routine, ...
    assert all(": " in note and len(note.split(": ", 1)[1]) > 10 for note in cfg.recipe.chosen)  # each says why


def test_options_given_by_hand_are_kept():
    cfg = resolve(CFG.with_overrides({"train.learning_rate": 0.5, "dp.noise_multiplier": 1.3, "rounds": 7}),
                  GIVEN | {"train.learning_rate", "dp.noise_multiplier", "rounds"})
    assert cfg.train.learning_rate == 0.5 and cfg.rounds == 7
    assert cfg.dp.target_epsilon == 0 and cfg.dp.noise_multiplier == 1.3  # a σ given by hand is not replaced
    assert not {"train.learning_rate", "rounds", "dp.target_epsilon"} & set(_chosen_keys(cfg))


def test_a_rate_given_by_hand_keeps_its_optimizer_and_a_rank_given_by_hand_keeps_the_scale():
    """A review: the README's config file gave learning_rate = 0.003 (an AdamW rate) and the recipe switched
    to plain SGD, which it barely moved (0.500 -> 0.500); `--lora-r 16` got alpha 4, a scale of 1/4, while
    recipe.chosen said "alpha / r = 2"."""
    cfg = resolve(CFG.with_overrides({"train.learning_rate": 0.003}), GIVEN | {"train.learning_rate"})
    assert (cfg.train.optimizer, cfg.train.learning_rate) == ("adamw", 0.003)
    assert "train.optimizer" not in _chosen_keys(cfg)
    both = resolve(CFG.with_overrides({"train.learning_rate": 2.0, "train.optimizer": "sgd"}),
                   GIVEN | {"train.learning_rate", "train.optimizer"})
    assert (both.train.optimizer, both.train.learning_rate) == ("sgd", 2.0)
    adam = resolve(CFG.with_overrides({"train.optimizer": "adamw"}), GIVEN | {"train.optimizer"})
    assert (adam.train.optimizer, adam.train.learning_rate) == ("adamw", 0.003), "no rate tuned for SGD"
    ranked = resolve(CFG.with_overrides({"lora.r": 16}), GIVEN | {"lora.r"})
    assert (ranked.lora.r, ranked.lora.alpha) == (16, 32.0)
    assert any(note.startswith("lora.alpha = 32.0: scale alpha / r = 2 at the rank given (16)")
               for note in ranked.recipe.chosen)


def test_a_default_value_given_by_hand_is_kept_too(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nlearning_rate = 0.003\noptimizer = \"adamw\"\n")
    cfg = resolve(CFG, GIVEN | given_keys(toml, {"rounds": None}))
    assert (cfg.train.optimizer, cfg.train.learning_rate) == ("adamw", 0.003)
    assert cfg.model.pooling == "mean"  # the rest of the recipe still applies


def test_without_a_hand_given_list_the_options_that_differ_from_the_defaults_count_as_given():
    """`flwr run` sees every key in its run config, so only a value off the default tells."""
    cfg = resolve(CFG.with_overrides({"train.learning_rate": 0.5}))
    assert cfg.train.learning_rate == 0.5 and "train.learning_rate" not in _chosen_keys(cfg)
    assert cfg.model.pooling == "mean"  # an option left at its default is still chosen


def test_a_budget_below_eight_is_the_target():
    cfg = resolve(CFG.with_overrides({"dp.epsilon_budget": 3.0}), GIVEN | {"dp.epsilon_budget"})
    assert cfg.dp.target_epsilon == 3.0


def test_a_budget_too_small_to_learn_from_is_refused_naming_dp_target_epsilon():
    """At ε = 0.01 the recipe's rate would round to nothing, and an invalid learning rate used to be blamed
    on train.learning_rate, which the user never set; at ε = 1e-4 no σ reaches the target at all."""
    from fedtune.errors import ConfigError

    for tiny, says in ((0.01, "times its signal"), (1e-4, "no noise multiplier reaches")):
        with pytest.raises(ConfigError, match=f"`dp.target_epsilon`.*{says}"):
            resolve(CFG.with_overrides({"dp.target_epsilon": tiny}), GIVEN | {"dp.target_epsilon"})
    by_hand = resolve(CFG.with_overrides({"dp.target_epsilon": 0.01, "train.learning_rate": 0.5}),
                      GIVEN | {"dp.target_epsilon", "train.learning_rate"})
    assert by_hand.train.learning_rate == 0.5, "a rate given by hand runs anyway"


def test_switched_off_nothing_changes():
    for cfg in (CFG.with_overrides({"recipe.mode": "off"}),
                CFG.with_overrides({"recipe.mode": "off", "dp.enabled": False})):
        resolved = resolve(cfg, GIVEN)
        assert resolved.recipe.chosen == ()
        assert dataclasses.replace(resolved, data=cfg.data) == cfg


def test_without_dp_a_federation_of_small_institutions_gets_small_batches_and_more_rounds():
    plain = CFG.with_overrides({"dp.enabled": False})
    cfg = resolve(plain, GIVEN | {"dp.enabled"})
    records = facts(cfg).records  # 200 demo notes, 4 institutions: about 40 records each
    assert cfg.train.batch_size == PLAIN_MIN_BATCH == 8 and max(records) < 16 * 8
    assert cfg.rounds == PLAIN_FEDERATED_ROUNDS and cfg.train.lr_schedule == "cosine"
    assert (cfg.early_stopping_patience, cfg.cooldown_rounds) == (PLAIN_PATIENCE, PLAIN_COOLDOWN)
    assert sorted(_chosen_keys(cfg)) == ["cooldown_rounds", "early_stopping_patience", "rounds", "train.batch_size",
                                         "train.lr_schedule"]
    # the private recipe's options are left alone without DP
    assert (cfg.model, cfg.lora, cfg.dp, cfg.train.optimizer) == (plain.model, plain.lora, plain.dp, "adamw")


def test_without_dp_one_holder_of_every_record_keeps_the_defaults_of_a_central_run():
    cfg = resolve(CFG.with_overrides({"dp.enabled": False, "clients": 1, "data.demo_examples": 2000}),
                  GIVEN | {"dp.enabled"})
    assert cfg.train.batch_size == 128 and cfg.rounds == 3 and cfg.train.lr_schedule == "constant"
    assert _chosen_keys(cfg) == ["train.batch_size"]


def test_without_dp_the_batch_gives_the_median_institution_ten_steps_an_epoch():
    assert [plain_batch_size(r) for r in [(80,) * 20, (360, 200, 500), (1629,), (5, 9), ()]] == [8, 32, 128, 8, 8]
    assert plain_batch_size((640, 640)) == 64 and plain_batch_size((639, 639)) == 32  # a power of two, at most n/10


def test_without_dp_options_given_by_hand_are_kept():
    cfg = resolve(CFG.with_overrides({"dp.enabled": False, "rounds": 2, "train.batch_size": 64}),
                  GIVEN | {"dp.enabled", "rounds", "train.batch_size"})
    assert (cfg.rounds, cfg.train.batch_size) == (2, 64)
    assert _chosen_keys(cfg) == ["train.lr_schedule", "early_stopping_patience", "cooldown_rounds"]


def test_without_dp_early_stopping_turned_off_by_hand_gets_no_cooldown():
    cfg = resolve(CFG.with_overrides({"dp.enabled": False, "early_stopping_patience": 0}),
                  GIVEN | {"dp.enabled", "early_stopping_patience"})
    assert (cfg.early_stopping_patience, cfg.cooldown_rounds) == (0, 0)
    assert "cooldown_rounds" not in _chosen_keys(cfg)


def test_under_client_level_dp_alone_there_is_no_early_stopping_to_choose():
    cfg = resolve(CFG.with_overrides({"dp.enabled": False, "dp.client_dp": "fixed", "dp.client_noise_multiplier": 1.0}),
                  GIVEN | {"dp.enabled", "dp.client_dp", "dp.client_noise_multiplier"})
    assert (cfg.early_stopping_patience, cfg.cooldown_rounds) == (0, 0)


def test_without_client_evaluation_there_is_no_early_stopping_to_choose():
    cfg = resolve(CFG.with_overrides({"dp.enabled": False, "strategy.fraction_evaluate": 0.0}),
                  GIVEN | {"dp.enabled", "strategy.fraction_evaluate"})
    assert cfg.early_stopping_patience == cfg.cooldown_rounds == 0 and cfg.rounds == PLAIN_FEDERATED_ROUNDS


def test_applying_it_twice_changes_nothing():
    once = resolve(CFG, GIVEN)
    assert resolve(once) == once and resolve(once, GIVEN) == once


def test_a_causal_lm_run_gets_only_the_budget():
    cfg = resolve(CFG.with_overrides({"model.task": "causal-lm"}), GIVEN)
    assert _chosen_keys(cfg) == ["dp.target_epsilon"] and cfg.train.optimizer == "adamw"


def test_a_causal_lm_run_without_dp_keeps_the_defaults():  # its rules were never measured
    plain = CFG.with_overrides({"model.task": "causal-lm", "dp.enabled": False})
    cfg = resolve(plain, GIVEN | {"dp.enabled"})
    assert cfg.recipe.chosen == ("nothing: every option the recipe sets was given, or it sets none for this task",)
    assert (cfg.rounds, cfg.train) == (plain.rounds, plain.train)


def test_the_facts_are_what_the_partition_reports():
    cfg = resolve(CFG, GIVEN)
    known = facts(cfg)
    assert isinstance(known, Facts) and known.labels == 4 and known.clients == 4
    assert len(known.records) == 4 and sum(known.records) < 200  # the server's hold-out is not a client's
    assert apply_recipe(cfg, GIVEN, facts) == cfg


def test_the_learning_rate_shrinks_as_the_noise_on_the_mean_update_grows():
    """r = σ√(m·d)/N: fewer records, or the same records split over more institutions, mean more noise."""
    def rate(clients: int, examples: int) -> float:
        cfg = CFG.with_overrides({"clients": clients, "data.demo_examples": examples})
        return resolve(cfg, GIVEN).train.learning_rate

    assert recipe_learning_rate(0.0) == BASE_LEARNING_RATE
    most = BASE_LEARNING_RATE * (4 / LABELS_REFERENCE) ** 0.5  # the demo's 4 labels
    assert rate(20, 300) < rate(20, 3000) < most
    # more noise, a smaller rate: so far as the labels factor leaves it alone (3 labels: not at all)
    assert recipe_learning_rate(0.4, 3) < recipe_learning_rate(0.1, 3) < BASE_LEARNING_RATE
    assert rate(20, 300) < 0.5 * BASE_LEARNING_RATE  # r ≈ 3 there: a third of the step


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 0.73, 1.5, 4.0])
def test_up_to_three_labels_the_rate_is_the_one_tuned_on_phrasebank(ratio):
    for labels in (0, 2, 3):
        assert recipe_learning_rate(ratio, labels) == round(BASE_LEARNING_RATE / (1 + ratio**2) ** 0.5, 2)


def _step(ratio: float, labels: int) -> float:
    """The step length, in units of C, at the recipe's rate: lr·√(s² + r²), s as the rule estimates it."""
    return recipe_learning_rate(ratio, labels) * (SIGNAL_SQRT_LABELS**2 / labels + ratio**2) ** 0.5


def test_more_labels_raise_the_rate_by_root_labels_in_a_noisy_federation():
    """The demo's federation (r = 0.44, 4 labels): the step is short of the cap, so it takes all of √(4/3)."""
    plain = BASE_LEARNING_RATE / (1 + 0.44**2) ** 0.5
    assert recipe_learning_rate(0.44, 4) == pytest.approx(plain * (4 / 3) ** 0.5, abs=0.01)
    assert recipe_learning_rate(0.44, 3) < recipe_learning_rate(0.44, 4) < recipe_learning_rate(0.44, 5)


def test_where_the_noise_is_small_the_labels_leave_the_rate_alone():
    """Central and distributed DP on BANKING77 (r = 0.08) collapsed at ×5.07 and at ×2: no factor there,
    the full ×2 from r = 0.37, where it was stable, and a straight line between."""
    for ratio in (0.0, 0.08, 0.14, LABELS_FULL_RATIO / 2):
        assert labels_factor_ceiling(ratio) == 1.0
        assert recipe_learning_rate(ratio, 77) == round(BASE_LEARNING_RATE / (1 + ratio**2) ** 0.5, 2)
    assert labels_factor_ceiling(0.75 * LABELS_FULL_RATIO) == pytest.approx(1.5)
    assert labels_factor_ceiling(LABELS_FULL_RATIO) == labels_factor_ceiling(2.0) == LABELS_MAX_FACTOR
    assert recipe_learning_rate(0.2, 77) < recipe_learning_rate(0.3, 77)


def test_the_labels_factor_never_takes_a_step_past_the_cap():
    """Federated DP on BANKING77 (r = 0.37): √(77/3) would be a step of 6.4 C, where it collapsed at 5; the
    rate stops at 2.5 C, which is about twice the plain rule's (the ×2 run that gained 3.9 points)."""
    plain = BASE_LEARNING_RATE / (1 + 0.37**2) ** 0.5
    assert _step(0.37, 77) == pytest.approx(LABELS_STEP_CAP, abs=0.01)
    assert recipe_learning_rate(0.37, 77) == pytest.approx(2 * plain, rel=0.02)
    for ratio in (0.2, 0.5, 0.62, 1.0):
        for labels in (4, 5, 10, 77, 150):
            assert _step(ratio, labels) <= LABELS_STEP_CAP + 0.01 or labels_factor(
                BASE_LEARNING_RATE / (1 + ratio**2) ** 0.5, ratio, labels) == 1.0


def test_the_labels_factor_never_lowers_the_rate():
    """At ε = 1 the plain rule's own step is longer than the cap (BANKING77: 3.3 C); the factor stays 1."""
    for ratio in (1.12, 2.31, 4.0):
        for labels in (5, 77):
            assert recipe_learning_rate(ratio, labels) == round(BASE_LEARNING_RATE / (1 + ratio**2) ** 0.5, 2)


def test_the_chosen_rate_says_what_set_its_labels_factor():
    from fedtune.tasks.classification import _labels_factor_why

    assert _labels_factor_why(0.73, 3).startswith("1 (3 labels")
    assert "held to a step of 2.5 C" in _labels_factor_why(0.37, 77)
    assert _labels_factor_why(0.44, 4).startswith("1.15 = √(4/3)")
    assert "the noise is small" in _labels_factor_why(0.08, 77)
    assert "at most 1.51 at this noise" in _labels_factor_why(0.28, 77)
    assert "already" in _labels_factor_why(2.31, 77)


def test_a_run_whose_every_recipe_option_was_given_is_not_chosen_for_again_later():
    """deploy-local resolves with the keys typed; the ServerApp later sees only values, and a σ of 1.0
    typed by hand looks like the default there. The record of the first resolution keeps it."""
    cfg = resolve(CFG.with_overrides({"model.task": "causal-lm"}), GIVEN | {"dp.noise_multiplier"})
    assert cfg.dp.target_epsilon == 0 and cfg.recipe.chosen
    assert resolve(cfg) == cfg


def test_sampling_fewer_institutions_a_round_means_fewer_records_a_round_and_more_noise():
    full = Facts(labels=4, clients=20, records=(100,) * 20, epsilon=8.0, delta=1e-5)
    sampled = dataclasses.replace(full, clients=5)
    # σ√(m·d)/N with N the round's records: 5 institutions of 100 against 20 of 100
    assert noise_to_signal(sampled, 3.0, 4000) == pytest.approx(noise_to_signal(full, 3.0, 4000) * 2.0)


def test_a_classifier_that_is_not_a_bert_style_encoder_gets_only_the_budget(tmp_path):
    """The last-layer rules and the SGD rate were tuned on BERT-style encoders; DistilBERT has no pooler."""
    from transformers import DistilBertConfig

    DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    cfg = resolve(CFG.with_overrides({"model.name_or_path": str(tmp_path)}), GIVEN | {"model.name_or_path"})
    assert _chosen_keys(cfg) == ["dp.target_epsilon"] and cfg.train.optimizer == "adamw"


def test_every_option_a_recipe_chooses_is_declared_auto_for_flwr_run():
    """pyproject.toml declares RECIPE_KEYS as "auto" (tests/test_options.py); a recipe choosing any other
    option would again be unable to tell a value given with `flwr run --run-config` from the default."""
    from fedtune.config import RECIPE_KEYS

    runs = [CFG, CFG.with_overrides({"dp.enabled": False}), CFG.with_overrides({"model.task": "causal-lm"})]
    chosen = {key for cfg in runs for key in _chosen_keys(resolve(cfg, GIVEN | {"dp.enabled", "model.task"})) if key}
    assert chosen and chosen <= RECIPE_KEYS, chosen - RECIPE_KEYS


def test_labels_that_are_codes_keep_the_random_head(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("text,label\n" + "".join(f"note {i},{1 + i % 3}\n" for i in range(60)))
    cfg = resolve(FedtuneConfig(clients=3, data=DataConfig(path=str(path))), GIVEN | {"data.path"})
    assert cfg.model.pooling == "mean" and cfg.model.head_init == "random"
    assert "model.head_init" not in _chosen_keys(cfg)


def _ratio_in_the_rate_note(cfg: FedtuneConfig) -> float:
    note = next(note for note in cfg.recipe.chosen if note.startswith("train.learning_rate"))
    return float(note.split("/N = ", 1)[1].split(",", 1)[0])


def test_small_institutions_are_told_that_the_noise_outweighs_the_signal_and_what_would_lower_it():
    """r > 1 (issue #19's shape: many small institutions) gets advice; it changes no option."""
    small = resolve(CFG.with_overrides({"clients": 20, "data.demo_examples": 400}), GIVEN)
    ratio = _ratio_in_the_rate_note(small)
    assert ratio > NOISY_RATIO and small.recipe.advice[0].startswith(f"r = {ratio:.2f} over 30 rounds: the noise")
    remedy = small.recipe.advice[1]
    assert "√20 = 4.5 times" in remedy and "--secagg --distributed-min-honest t" in remedy
    # distributed DP with every institution's share: the sum carries σ once, so r falls by √20
    at_20, at_10 = map(float, re.search(r"r = ([\d.]+) at t = 20, ([\d.]+) at t = 10", remedy).groups())
    assert at_20 == pytest.approx(ratio / 20**0.5, abs=0.006) and at_10 == pytest.approx(ratio / 10**0.5, abs=0.006)
    assert resolve(small) == small  # applied once: a later resolution keeps it as it is
    # fewer rounds by hand: a smaller σ a step, so a smaller r a round, but as much noise over the run
    one_round = resolve(CFG.with_overrides({"clients": 20, "data.demo_examples": 400, "rounds": 1}), GIVEN | {"rounds"})
    assert _ratio_in_the_rate_note(one_round) < NOISY_RATIO and one_round.recipe.advice == small.recipe.advice


def test_no_advice_where_the_signal_outweighs_the_noise_or_the_noise_is_already_shared():
    roomy = resolve(CFG.with_overrides({"data.demo_examples": 2000}), GIVEN)
    assert _ratio_in_the_rate_note(roomy) <= NOISY_RATIO and roomy.recipe.advice == ()
    shared = resolve(CFG.with_overrides({"clients": 20, "data.demo_examples": 400, "dp.secagg": True,
                                         "dp.distributed_min_honest": 20}),
                     GIVEN | {"dp.secagg", "dp.distributed_min_honest"})
    assert _ratio_in_the_rate_note(shared) <= NOISY_RATIO and shared.recipe.advice == ()
    for plain in (CFG.with_overrides({"dp.enabled": False}), CFG.with_overrides({"model.task": "causal-lm"})):
        assert resolve(plain, GIVEN | {"dp.enabled", "model.task"}).recipe.advice == ()


def test_the_advice_names_the_federation_only_where_there_is_one():
    one = Facts(labels=4, clients=1, records=(80,), epsilon=8.0, delta=1e-5)
    many = dataclasses.replace(one, clients=20, records=(40,) * 20)
    assert noise_advice(many, NOISY_RATIO) == () and noise_advice(one, 0.5) == ()
    assert "√20" in noise_advice(many, 1.86)[1] and "one holder of all 800 records" in noise_advice(many, 1.86)[1]
    assert "(r = 0.99 at t = 2; " in noise_advice(dataclasses.replace(many, clients=2, records=(40, 40)), 1.4)[1]
    assert "--secagg" not in " ".join(noise_advice(one, 2.0)) + " ".join(noise_advice(many, 2.0, min_honest=10))
    assert noise_advice(dataclasses.replace(one, epsilon=0.0), 2.0)[0].startswith("r = 2.00: the noise")  # σ by hand
    sampled = noise_advice(dataclasses.replace(many, clients=5), 1.86)[1]  # 5 of the 20 a round
    assert "Each of the 5 institutions" in sampled and "all 800 records" in sampled
    users = noise_advice(many, 1.86, can_share=False, unit="user")[1]  # distributed DP is record-level only
    assert "all 800 users" in users and "--secagg" not in users


def test_no_advice_for_a_layout_given_by_hand_whose_noise_the_recipe_does_not_count():
    cfg = CFG.with_overrides({"clients": 20, "data.demo_examples": 400, "lora.r": 8})
    assert resolve(cfg, GIVEN | {"lora.r"}).recipe.advice == ()


def test_distributed_dp_is_suggested_only_where_the_run_could_use_it():
    """FedProx is not a plain mean of noised sums, so config.py refuses distributed DP with it."""
    cfg = CFG.with_overrides({"clients": 20, "data.demo_examples": 400, "strategy.name": "fedprox"})
    advice = resolve(cfg, GIVEN | {"strategy.name"}).recipe.advice
    assert advice and "√20" in advice[1] and "--secagg" not in advice[1]


# One holder of 2,400 records (the demo's 3,000 less the server's hold-out): small noise per step.
CENTRAL = CFG.with_overrides({"clients": 1, "data.demo_examples": 3000})


def test_one_holder_of_many_records_takes_several_local_steps_a_round():
    """Where each step's noise is small, k Poisson steps of rate 1/k replace the one full-batch step."""
    from fedtune.privacy.budget import poisson_schedule

    cfg = resolve(CENTRAL, GIVEN)
    (n,) = facts(cfg).records
    assert cfg.train.batch_size == math.ceil(n / MAX_LOCAL_STEPS) and cfg.train.local_epochs == 1
    assert cfg.train.sample_rate == 0.0 and cfg.rounds == 30, "one holder's steps need no more rounds"
    assert poisson_schedule(n, cfg.train.batch_size, 1) == (1 / MAX_LOCAL_STEPS, MAX_LOCAL_STEPS)
    note = next(note for note in cfg.recipe.chosen if note.startswith("train.batch_size"))
    assert f"{MAX_LOCAL_STEPS} DP-SGD steps a round" in note and "same ε" in note
    # the labels factor was measured for one step a round only: the rate is the first factor's
    assert "labels factor was measured only for one" in next(
        note for note in cfg.recipe.chosen if note.startswith("train.learning_rate"))


def test_small_institutions_keep_one_full_batch_step():
    """20 institutions of 50 records: one of four steps would carry noise of several C (PhraseBank's 9.5 C
    gained nothing in bench/dp_emulator.py; banking24's 18.6 C collapsed)."""
    small = Facts(labels=3, clients=20, records=(50,) * 20, epsilon=8.0, delta=1e-5)
    steps, noise = recipe_local_steps(small, 30, 4227)
    assert steps == 1 and noise > LOCAL_STEP_NOISE
    assert local_steps_batch(small, 1) == 4096
    cfg = resolve(CFG, GIVEN)  # 4 institutions of about 40
    assert cfg.train.batch_size == 4096 and "too few for several" in next(
        note for note in cfg.recipe.chosen if note.startswith("train.local_epochs"))


@pytest.mark.parametrize("records", [(50,) * 20, (900,), (3400,), (8000,), (434, 434, 435), (600, 5000), (2,)])
def test_the_local_steps_are_the_most_whose_step_noise_stays_below_the_signal(records):
    known = Facts(labels=6, clients=len(records), records=records, epsilon=8.0, delta=1e-5)
    values, smallest = 3072 + 385 * 6, min(records)
    steps, noise = recipe_local_steps(known, 30, values)
    assert noise == pytest.approx(local_step_noise(recipe_sigma(known, 30, steps), steps, values, smallest))
    assert steps == 1 or noise <= LOCAL_STEP_NOISE
    more = 2 * steps
    assert (more > MAX_LOCAL_STEPS or more > smallest
            or local_step_noise(recipe_sigma(known, 30, more), more, values, smallest) > LOCAL_STEP_NOISE)


def test_the_smallest_institution_solves_the_sigma_the_rule_assumed():
    """The rule reads each step's noise from σ for rate 1/k over 30·k steps; the institution, given the chosen
    batch, solves its own σ (privacy/budget.py) for the rate and steps Opacus' loader gives it: the same σ."""
    from fedtune.privacy.budget import client_dp

    cfg = resolve(CENTRAL, GIVEN)
    known = facts(cfg)
    solved = client_dp(cfg.dp, None, known.records[0], cfg.train.batch_size, 1, cfg.rounds_per_client())
    assert solved.noise_multiplier == recipe_sigma(known, 30, MAX_LOCAL_STEPS), "one solver, one schedule"


def test_a_round_stays_one_full_batch_step_where_it_must():
    """A σ given by hand (k steps would spend another ε) and a white-box audit's public streams (every record
    in every step) keep q = 1."""
    by_hand = resolve(CENTRAL.with_overrides({"dp.noise_multiplier": 2.0}), GIVEN | {"dp.noise_multiplier"})
    public = resolve(CENTRAL.with_overrides({"dp.public_streams": True}), GIVEN | {"dp.public_streams"})
    assert by_hand.train.batch_size == public.train.batch_size == 4096


def test_a_batch_given_by_hand_is_the_run_s_own_step_and_keeps_the_labels_factor():
    cfg = resolve(CENTRAL.with_overrides({"train.batch_size": 4096}), GIVEN | {"train.batch_size"})
    assert cfg.train.batch_size == 4096
    assert "labels factor was measured only" not in next(
        note for note in cfg.recipe.chosen if note.startswith("train.learning_rate"))


# Distributed DP over many records: the round's sum is one step over all of them.
SHARED = CENTRAL.with_overrides({"clients": 4, "dp.secagg": True, "dp.distributed_min_honest": 4})
SHARED_GIVEN = GIVEN | {"dp.secagg", "dp.distributed_min_honest"}


def test_under_distributed_dp_several_steps_become_rounds_of_one_sampled_step():
    """Each share must be of one step, so k steps per full-batch round become k rounds of one Poisson step
    at rate 1/k at every institution, with σ solved for the k times as many steps (the same ε)."""
    from fedtune.privacy.budget import client_dp
    from fedtune.privacy.distributed import not_one_sgd_step
    from fedtune.recipe import RECIPE_ROUNDS, sampled_round_steps

    cfg = resolve(SHARED, SHARED_GIVEN)
    known = facts(cfg)
    k, noise = sampled_round_steps(known, RECIPE_ROUNDS, 3072 + 385 * known.labels, 4)
    assert k == MAX_LOCAL_STEPS and noise <= LOCAL_STEP_NOISE
    assert cfg.train.sample_rate == 1 / k and cfg.rounds == RECIPE_ROUNDS * k and cfg.train.local_epochs == 1
    assert all(not_one_sgd_step(cfg.train, n) == "" for n in known.records), "each share is still of one step"
    for n in known.records:  # every institution solves the same σ: the one the rule assumed
        solved = client_dp(cfg.dp, None, n, cfg.train.batch_size, 1, cfg.rounds_per_client(), cfg.train.sample_rate)
        assert solved.noise_multiplier == pytest.approx(recipe_sigma(known, RECIPE_ROUNDS, k, "skellam"), rel=0.01)
    assert "each becomes 4 rounds of one sampled step" in next(n for n in cfg.recipe.chosen if n.startswith("rounds"))


def test_under_distributed_dp_the_sum_s_step_noise_sets_the_rounds():
    """The rule is the local steps' one, read on the round's sum: σ√(m/t)·k·√d over the N/k records it samples."""
    from fedtune.recipe import sampled_round_steps

    values = 3072 + 385 * 6
    for records, t in [((50,) * 20, 20), ((50,) * 20, 10), ((3000,) * 4, 4), ((3000,) * 4, 2), ((120,) * 20, 20),
                       ((150,) * 20, 0), ((50,) * 20, 0), ((3000,) * 4, 0)]:
        known = Facts(labels=6, clients=len(records), records=records, epsilon=8.0, delta=1e-5)
        k, noise = sampled_round_steps(known, 30, values, t)
        scale = (len(records) / (t or 1)) ** 0.5  # t = 0: each institution adds all of σ, the sum σ√m
        sigma = recipe_sigma(known, 30, k, "skellam" if t else "prv")  # distributed DP's integer shares: Skellam
        assert noise == pytest.approx(scale * local_step_noise(sigma, k, values, sum(records)))
        assert k == 1 or noise <= LOCAL_STEP_NOISE
        assert 2 * k > MAX_LOCAL_STEPS or scale * local_step_noise(
            recipe_sigma(known, 30, 2 * k, "skellam" if t else "prv"), 2 * k, values, sum(records)) > LOCAL_STEP_NOISE
    # every institution's share (t = m): the sum's step is one holder's of all the records, under the
    # accountant of the integer shares (RDP at integer orders: a little above PRV's Gaussian curve, so a larger σ)
    shared, alone = Facts(3, 20, (50,) * 20, 8.0, 1e-5), Facts(3, 1, (1000,), 8.0, 1e-5)
    k, noise = sampled_round_steps(shared, 30, 4227, 20)
    assert noise == pytest.approx(local_step_noise(recipe_sigma(alone, 30, k, "skellam"), k, 4227, 1000))
    assert noise > local_step_noise(recipe_sigma(alone, 30, k), k, 4227, 1000)


def test_under_distributed_dp_given_rounds_or_steps_keep_full_batch_rounds():
    for key, value in [("rounds", 30), ("train.batch_size", 4096), ("train.local_epochs", 1)]:
        cfg = resolve(SHARED.with_overrides({key: value}), SHARED_GIVEN | {key})
        assert cfg.train.sample_rate == 0.0 and cfg.rounds == 30
    fixed = resolve(SHARED.with_overrides({"train.sample_rate": 0.5}), SHARED_GIVEN | {"train.sample_rate"})
    assert fixed.train.sample_rate == 0.5 and fixed.rounds == 30, "a rate given by hand is the run's own"


# Twenty institutions of about 110 records each, each adding the noise its own ε needs (no shared noise).
MANY = CENTRAL.with_overrides({"clients": 20})


def test_a_federation_of_small_institutions_takes_its_steps_as_sampled_rounds():
    """One of k local steps on an institution's ~110 records would carry several C of noise, but a round of
    one sampled step at every institution is averaged at once: one step over every record at noise σ√m.
    The rule reads that step's noise, and the run takes k rounds of rate 1/k per full-batch round."""
    from fedtune.privacy.budget import client_dp

    cfg = resolve(MANY, GIVEN)
    known = facts(cfg)
    values = 3072 + 385 * known.labels
    assert recipe_local_steps(known, 30, values)[0] == 1, "each institution alone is too small for local steps"
    k, noise = sampled_round_steps(known, 30, values)
    assert k > 1 and noise <= LOCAL_STEP_NOISE
    assert noise == pytest.approx(20**0.5 * local_step_noise(recipe_sigma(known, 30, k), k, values,
                                                             round(known.records_per_round)))
    assert cfg.train.sample_rate == 1 / k and cfg.rounds == 30 * k and cfg.train.local_epochs == 1
    for n in known.records:  # every institution solves the σ the rule assumed: the same ε over 30·k steps
        solved = client_dp(cfg.dp, None, n, cfg.train.batch_size, 1, cfg.rounds_per_client(), cfg.train.sample_rate)
        assert solved.noise_multiplier == pytest.approx(recipe_sigma(known, 30, k), rel=0.01)
    notes = {note.split(" = ", 1)[0]: note for note in cfg.recipe.chosen}
    assert f"each becomes {k} rounds of one sampled step" in notes["rounds"]
    assert "no institution drifts" in notes["train.local_epochs"]
    assert "labels factor was measured only for one" in notes["train.learning_rate"]


def test_a_federation_of_large_institutions_keeps_its_local_steps():
    """Two institutions of about 1,100 records: each one's local steps are quiet enough, and they need no
    more rounds; sampled rounds are for institutions too small for local steps."""
    cfg = resolve(CENTRAL.with_overrides({"clients": 2}), GIVEN)
    assert cfg.train.sample_rate == 0.0 and cfg.rounds == 30
    assert cfg.train.batch_size == math.ceil(min(facts(cfg).records) / MAX_LOCAL_STEPS)


def test_where_the_sum_s_noise_is_large_a_federation_keeps_full_batch_rounds():
    """Four institutions of about 40 records (the shape where federated DP is noisiest): even two sampled
    rounds would carry more noise in their sum than the largest signal clipping lets through."""
    cfg = resolve(CFG, GIVEN)
    known = facts(cfg)
    k, noise = sampled_round_steps(known, 30, 3072 + 385 * known.labels)
    assert k == 1 and noise > LOCAL_STEP_NOISE
    assert cfg.train.sample_rate == 0.0 and cfg.rounds == 30 and cfg.train.batch_size == 4096


def test_rounds_or_steps_given_by_hand_keep_a_federation_s_full_batch_rounds():
    for key, value in [("rounds", 30), ("train.batch_size", 4096), ("train.local_epochs", 1)]:
        cfg = resolve(MANY.with_overrides({key: value}), GIVEN | {key})
        assert cfg.train.sample_rate == 0.0 and cfg.rounds == 30
    public = resolve(MANY.with_overrides({"dp.public_streams": True}), GIVEN | {"dp.public_streams"})
    assert public.train.sample_rate == 0.0, "a white-box audit's streams need every record in every step"
