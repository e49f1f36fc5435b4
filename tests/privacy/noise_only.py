"""A tiny model for tests that need to see DP-SGD's noise and sampling directly."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class NoiseOnly(torch.nn.Module):
    """A model whose loss has zero gradient, so each DP-SGD step moves the weights by the noise
    alone; it notes which records each step sampled (a record's only token is its index)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(4, 16)
        self.batches: list[set[int]] = []

    def forward(self, input_ids, attention_mask, labels):
        self.batches.append(set(input_ids[:, 0].tolist()))
        return SimpleNamespace(loss=(self.embedding(input_ids) * 0.0).sum())
