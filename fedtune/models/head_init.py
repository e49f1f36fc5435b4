"""model.head_init = "label-names": the classification head starts as a nearest-label-name classifier.

Row k of the head is the model's own pooled representation of label k's name (its underscores and
hyphens read as spaces), rescaled to norm HEAD_ROW_NORM; the bias starts at zero. Before any
training the model then predicts, for each text, the label whose name it lies closest to in angle:
a sentence encoder such as the default MiniLM was trained to place a text near a description of
it. DP-SGD starts from there instead of from a random head (measured: docs/recipe.md).

Privacy: this reads the label names of the run config (data.labels) and nothing else. Every party,
the coordinator included, holds that list already, so the head's start is public and spends no ε.
"""

from __future__ import annotations

import re

import torch
from peft import PeftModel

from fedtune.errors import ConfigError

HEAD_ROW_NORM = 3.0  # norm 3 against 10 on PhraseBank's validation split, in bench/dp_emulator.py (docs/recipe.md)


def readable(label: str) -> str:
    """A label as words: `card_arrival` -> `card arrival`."""
    return re.sub(r"[_\-]+", " ", label).strip()


def names_are_words(labels: tuple[str, ...] | list[str]) -> bool:
    """Whether the label names say something: each has a letter, and no two are the same once
    digits are dropped (codes such as `1` .. `5` or `LABEL_0` .. `LABEL_4` do not)."""
    stems = [re.sub(r"\d+", "", readable(label)).strip().lower() for label in labels]
    return all(re.search(r"[^\W\d_]", stem) for stem in stems) and len(set(stems)) == len(stems)


def init_head_from_label_names(model: PeftModel, labels: list[str], tokenizer, max_length: int,
                               norm: float = HEAD_ROW_NORM) -> None:
    """Set the trainable head of `model` (a PEFT sequence classifier, freshly built) from `labels`,
    each row rescaled to `norm` (bench/dp_emulator.py tries others)."""
    head = _head(model)
    inputs = tokenizer([readable(label) for label in labels], truncation=True, max_length=max_length,
                       padding=True, return_tensors="pt").to(head.weight.device)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
        model.train(was_training)
    names = torch.nn.functional.normalize(captured[0].float(), dim=1)
    with torch.no_grad():
        head.weight.copy_(norm * names)
        if head.bias is not None:
            head.bias.zero_()


def _head(model: PeftModel) -> torch.nn.Linear:
    """The trainable copy of the classifier's linear layer (peft's modules_to_save)."""
    wrapper = linear_head(model.base_model.model)
    return wrapper.modules_to_save[model.active_adapter]


def linear_head(classifier: torch.nn.Module) -> torch.nn.Module:
    """The head module of a transformers sequence classifier (`classifier`, or `score` for decoder
    models), when it is one linear layer (or peft's wrapper around one); ConfigError otherwise."""
    head = getattr(classifier, "classifier", None) or getattr(classifier, "score", None)
    inner = getattr(head, "original_module", head)
    if not isinstance(inner, torch.nn.Linear):
        raise ConfigError(f"Invalid option `model.head_init`: `label-names` needs a classifier whose head is one "
                          f"linear layer, and {type(classifier).__name__}'s is "
                          f"{type(inner).__name__ if inner is not None else 'not found'}. Use head_init = \"random\".")
    return head
