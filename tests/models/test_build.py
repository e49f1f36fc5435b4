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


def test_a_decoder_classifier_reads_each_text_at_its_own_last_token_whatever_its_batchmates(tmp_path):
    """A review: batches are padded with PAD_ID (0), and a decoder classifier (a `score` head) reads the rightmost
    token that is not its config's pad id (SmolLM2's: 2), so a short text was read at a padding position the
    longest text in its batch set: one record more changed the others' gradients, beyond the C the noise covers."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedtune.data.text import pad_batch

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=2, num_labels=3)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    model = build_model(ModelConfig(name_or_path=str(tmp_path)), LoraConfig(r=2), num_labels=3, cache_prefix=False)
    model.eval()
    short, long = torch.tensor([5, 9, 13]), torch.tensor([7, 11, 17, 19, 23, 29, 31])
    label = torch.tensor(0)
    with torch.no_grad():
        alone = model(**pad_batch([(short, label)])).logits[0]
        beside = model(**pad_batch([(short, label), (long, label)])).logits[0]
    torch.testing.assert_close(beside, alone)
    # a merged export gets its tokenizer's pad id back, for whoever batches with that tokenizer
    from types import SimpleNamespace

    from fedtune.models.build import read_at_own_last_token, tokenizer_pad_id
    fresh = LlamaForSequenceClassification(config)
    read_at_own_last_token(fresh)
    assert fresh.config.pad_token_id == 0
    tokenizer_pad_id(fresh, SimpleNamespace(pad_token_id=2))
    assert fresh.config.pad_token_id == 2
