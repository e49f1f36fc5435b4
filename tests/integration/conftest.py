"""A tiny classifier for the federations that test the protocol, the accounting or the aggregation,
not learning (those keep the default MiniLM)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden size 32) with the default MiniLM's tokenizer, for
    `--model`: the same code paths as the default classifier (BERT attention `query`/`value` for LoRA,
    pooler, DP-SGD through Opacus), but a round takes a second or two on a CPU instead of ten or more."""
    import torch
    from transformers import BertConfig, BertModel

    from fedtune.models.build import load_tokenizer

    tokenizer = load_tokenizer("")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
