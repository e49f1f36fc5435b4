"""The payload is the trainable weights only, round-trips exactly, and exports in PEFT format."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedtune.data.demo import LABELS
from fedtune.models.adapter import base_model_bytes, load_record, save_adapter, to_record
from fedtune.models.build import default_model_dir


def test_only_lora_pooler_and_head_are_trainable(tiny_model):
    names = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n or "pooler" in n for n in names)
    assert any("query" in n for n in names) and any("value" in n for n in names)
    frozen = [n for n, p in tiny_model.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen) and any("attention.self.query.base_layer" in n for n in frozen)


def test_payload_is_adapter_sized(tiny_model):
    payload = to_record(tiny_model).count_bytes()
    assert base_model_bytes(tiny_model) > 80e6  # the real 22.7M-parameter MiniLM
    assert payload <= 0.02 * base_model_bytes(tiny_model)


def test_record_round_trip_restores_weights(tiny_model):
    before = to_record(tiny_model)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    load_record(tiny_model, before)
    for name, tensor in before.to_torch_state_dict().items():
        torch.testing.assert_close(dict(tiny_model.named_parameters())[name].detach(), tensor)


def test_mismatched_payload_is_refused(tiny_model):
    record = to_record(tiny_model)
    del record[next(iter(record.keys()))]
    with pytest.raises(ValueError, match="does not match"):
        load_record(tiny_model, record)


def test_saved_adapter_loads_with_peft(tiny_model, tmp_path):
    with torch.no_grad():
        lora_b = next(p for n, p in tiny_model.named_parameters() if "lora_B" in n)
        lora_b.fill_(0.01)  # LoRA B starts at zero; make the adapter non-trivial
    save_adapter(tiny_model, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=len(LABELS))
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    batch = {"input_ids": torch.tensor([[101, 2023, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    tiny_model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, tiny_model(**batch).logits)
    with torch.no_grad():
        lora_b.zero_()
