"""model.head_init = "label-names": the head starts as a nearest-label-name classifier, built from the
run config's label names alone."""

from __future__ import annotations

import csv

import pytest
import torch

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.models.head_init import HEAD_ROW_NORM, names_are_words, readable
from fedtune.tasks.base import get_task

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top-up failed"]


def _cfg(tmp_path, rows, **options) -> FedtuneConfig:
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    return FedtuneConfig.from_flat({"data.path": str(path), "data.labels": LABELS, "model.pooling": "mean",
                                    "model.head_init": "label-names", **options})


def _initial(cfg: FedtuneConfig):
    task = get_task(cfg.model.task)
    return task, task.initial_model(cfg.model, cfg.lora, cfg.data, cfg.seed)


def _logits(task, model, cfg, texts):
    tokenizer = task.tokenizer(cfg.model)
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


@pytest.mark.parametrize("labels, words", [
    (["negative", "neutral", "positive"], True), (["card_arrival", "age_limit"], True),
    (["1", "2", "3"], False), (["LABEL_0", "LABEL_1"], False), (["class 1", "class 2"], False),
])
def test_only_names_that_are_words_count(labels, words):
    assert names_are_words(labels) is words


def test_the_model_starts_by_naming_each_label_from_its_own_name(tmp_path):
    cfg = _cfg(tmp_path, [("my card has not come", LABELS[0])] * 4)
    task, model = _initial(cfg)
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert torch.allclose(head.weight.norm(dim=1), torch.full((len(LABELS),), HEAD_ROW_NORM))
    assert torch.count_nonzero(head.bias) == 0
    logits = _logits(task, model, cfg, [readable(label) for label in LABELS])
    assert logits.argmax(-1).tolist() == list(range(len(LABELS)))
    # and texts it never saw, by meaning
    assert _logits(task, model, cfg, ["what is today's rate for euros to dollars",
                                      "someone stole my card"]).argmax(-1).tolist() == [1, 2]


def test_the_start_reads_no_record(tmp_path):
    """Two institutions' data, the same label names: the same round-0 head, bit for bit."""
    heads = []
    for name, rows in (("a", [("exchange rate for euros", LABELS[1])] * 4),
                       ("b", [("card stolen at the station", LABELS[2])] * 9)):
        (tmp_path / name).mkdir()
        _, model = _initial(_cfg(tmp_path / name, rows))
        heads.append(model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


def test_codes_for_labels_are_refused_before_the_run(tmp_path):
    cfg = _cfg(tmp_path, [("a", "1")], **{"data.labels": ["1", "2", "3"]})
    with pytest.raises(ConfigError, match="model.head_init.*codes"):
        get_task(cfg.model.task).check_config(cfg)


def test_a_causal_lm_has_no_head_to_start(tmp_path):
    cfg = FedtuneConfig.from_flat({"model.task": "causal-lm", "model.head_init": "label-names"})
    with pytest.raises(ConfigError, match="model.head_init.*classification only"):
        get_task(cfg.model.task).check_config(cfg)
