"""A tiny causal LM for the causal-LM unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with tied embeddings and SmolLM2's tokenizer (chat template
    included): the same code paths as SmolLM2-135M, in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.models.build import load_tokenizer
    from fedtune.models.default_lm import default_lm_dir

    tokenizer = load_tokenizer(str(default_lm_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
