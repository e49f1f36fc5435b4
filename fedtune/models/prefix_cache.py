"""Run an encoder's frozen lower layers once per text, not once per round.

When every weight a classifier trains sits in encoder layer k or above (the private recipe trains
LoRA in the last layer only), the embeddings and layers 0..k-1 give a text the same states in every
round and every pass. `cache_frozen_prefix` then has them computed once per distinct text and kept
in memory: a later round runs only layers k and up and the head, forward and backward. On MiniLM-L6
with LoRA in layer 5 that is about a sixth of the work per round after the first
(bench/dp_emulator.py times the same split).

What changes, and what does not:
- The states are the ones the full model computes in eval mode: the frozen layers run without
  dropout. The trained layers above keep theirs. Nothing else differs: a padded batch gets, on its
  real tokens, exactly the states the full model gives them (tests/models/test_prefix_cache.py), and
  the padding positions are never read (the attention mask hides them from layer k, and pooling and
  the loss skip them).
- Privacy is untouched: the cache holds features of the texts this process has already read (in a
  deployment, the institution's own; in a simulation, the virtual clients' that its worker served), in
  its own memory, and is never sent or written. DP-SGD's per-sample gradients and clipping apply to the
  trained weights as before.
- The module names under which peft saves the adapter are unchanged: the layers below k stay in
  their places, as pass-through modules, so `layer.5...lora_A` is still `layer.5...lora_A`.

Written by hand: transformers and peft cache keys and values for generation, not a frozen prefix's
outputs for training.
"""

from __future__ import annotations

import re

import torch

from fedtune.data.text import PAD_ID

MAX_CACHED_VALUES = 2**28  # 1 GiB of fp32 per process; texts past it are computed every time
_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")


class PassThrough(torch.nn.Module):
    """Stands in for a frozen layer whose output the prefix already computed."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class FrozenPrefix(torch.nn.Module):
    """The embeddings plus the frozen layers below k, memoised per text (its token ids up to padding)."""

    def __init__(self, embeddings: torch.nn.Module, layers: list[torch.nn.Module], pad_id: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = torch.nn.ModuleList(layers)
        self.pad_id = pad_id
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}
        self.cached_values = 0
        super().train(False)

    def train(self, mode: bool = True) -> FrozenPrefix:
        return super().train(False)  # frozen layers always run as in eval mode, so the cache is one value

    def forward(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        if input_ids is None or inputs_embeds is not None or position_ids is not None:
            raise RuntimeError("fedtune's frozen-prefix cache reads token ids only; call the model with input_ids.")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        lengths = (input_ids != self.pad_id).long().cumsum(1).argmax(1) + 1  # through the last real token
        keys = [tuple(ids[:n].tolist()) + tuple(types[:n].tolist())
                for ids, types, n in zip(input_ids, token_type_ids, lengths.tolist(), strict=True)]
        states = {key: self.memo[key] for key in keys if key in self.memo}
        self._compute([(key, ids, types, n) for key, ids, types, n in
                       zip(keys, input_ids, token_type_ids, lengths.tolist(), strict=True) if key not in states],
                      states)
        out = input_ids.new_zeros((*input_ids.shape, self.embeddings.word_embeddings.embedding_dim),
                                  dtype=next(self.embeddings.parameters()).dtype)
        for row, (key, n) in enumerate(zip(keys, lengths.tolist(), strict=True)):
            out[row, :n] = states[key]
        return out

    @torch.no_grad()
    def _compute(self, missing: list, states: dict) -> None:
        """The prefix for texts not yet cached, in batches of equal length (so no padding, no mask)."""
        by_length: dict[int, dict] = {}
        for item in missing:  # a text twice in one batch is computed once
            by_length.setdefault(item[3], {})[item[0]] = item
        for n, items in by_length.items():
            ids = torch.stack([item[1][:n] for item in items.values()])
            types = torch.stack([item[2][:n] for item in items.values()])
            hidden = self.embeddings(input_ids=ids, token_type_ids=types)
            for layer in self.layers:
                hidden = layer(hidden)
            for key, value in zip(items, hidden, strict=True):
                states[key] = value
                if self.cached_values + value.numel() <= MAX_CACHED_VALUES:
                    self.memo[key] = value
                    self.cached_values += value.numel()


def first_trained_layer(model: torch.nn.Module) -> int | None:
    """The lowest encoder layer holding a trained weight; None when something below the layers (the
    embeddings) trains, or the model has no numbered encoder layers."""
    layers = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = _LAYER.search(f".{name}")
        if match:
            layers.append(int(match.group(1)))
        elif ".embeddings." in f".{name}":
            return None
    encoder = _encoder_of(model)
    if encoder is None:
        return None
    return min(layers, default=len(encoder.encoder.layer))


def cache_frozen_prefix(model: torch.nn.Module) -> int:
    """Install the cache on a PEFT classifier when its lower layers are all frozen; returns how many
    layers it covers (0: not installed)."""
    encoder = _encoder_of(model)
    k = first_trained_layer(model)
    if encoder is None or not k:
        return 0
    layers = encoder.encoder.layer
    # The padding is told by fedtune's collator's value, not the model's pad id (RoBERTa's is 1): read as
    # text, padding would change a record's cached states with the longest text in its batch, and so its
    # per-sample gradient with the other records sampled beside it, beyond DP-SGD's sensitivity C.
    encoder.embeddings = FrozenPrefix(encoder.embeddings, [layers[i] for i in range(k)], pad_id=PAD_ID)
    for i in range(k):
        layers[i] = PassThrough()
    return k


def _encoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The BERT-style encoder (with .embeddings and .encoder.layer) inside a (PEFT) classifier."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    encoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if encoder is None or not hasattr(encoder, "embeddings") or not hasattr(getattr(encoder, "encoder", None), "layer"):
        return None
    return encoder
