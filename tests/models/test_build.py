"""Building the base model + LoRA: always in fp32, whatever dtype the checkpoint was saved in."""

from __future__ import annotations

import torch

from fedtune.config import LoraConfig, ModelConfig
from fedtune.models.build import build_model


def test_a_checkpoint_saved_in_bf16_trains_in_fp32(tmp_path):
    """Opacus clips each parameter's per-sample gradients in that parameter's dtype, so a bf16 head
    would let clipped gradients pass C (privacy/dpsgd.py); fp32 comes from loading, not from luck."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_labels=3)
    BertForSequenceClassification(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = build_model(ModelConfig(name_or_path=str(tmp_path)), LoraConfig(r=2), num_labels=3)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trained) and any("lora_" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
