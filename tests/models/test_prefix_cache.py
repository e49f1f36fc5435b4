"""The frozen-prefix cache gives the full model's outputs and gradients, and leaves the adapter alone."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import LoraConfig, ModelConfig
from fedtune.data.demo import make_demo_dataset
from fedtune.data.text import pad_batch, tokenize
from fedtune.models.build import build_model, load_tokenizer
from fedtune.models.prefix_cache import FrozenPrefix, PassThrough, first_trained_layer

LAST_LAYER = LoraConfig(r=2, alpha=4.0, modules_to_save=(),
                        target_modules=("layer.5.attention.self.query", "layer.5.attention.self.value"))


def _pair(lora: LoraConfig):
    """A model built the usual way (cache on when it applies) and the same one without any cache."""
    cached = build_model.__wrapped__(ModelConfig(pooling="mean"), lora, num_labels=4, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fedtune.models.build.cache_frozen_prefix", lambda model: 0)
        plain = build_model.__wrapped__(ModelConfig(pooling="mean"), lora, num_labels=4, seed=3)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn_like(p) * 0.05) if p.requires_grad else None
        trained = dict(plain.named_parameters())
        for name, p in cached.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    return cached, plain


def _batch(n: int = 12) -> dict:
    examples = make_demo_dataset(n, seed=5)
    data = tokenize(load_tokenizer(""), [e.text for e in examples], [e.label for e in examples], 64)
    return pad_batch([data[i] for i in range(len(data))])


def test_installed_only_when_the_lower_layers_are_frozen():
    cached, _ = _pair(LAST_LAYER)
    encoder = cached.base_model.model.bert
    assert isinstance(encoder.embeddings, FrozenPrefix)
    assert [type(layer) is PassThrough for layer in encoder.encoder.layer] == [True] * 5 + [False]
    every_layer = build_model.__wrapped__(ModelConfig(), LoraConfig(r=2), num_labels=4, seed=0)
    assert first_trained_layer(every_layer) == 0
    assert not isinstance(every_layer.base_model.model.bert.embeddings, FrozenPrefix)


def test_outputs_and_per_batch_gradients_match_the_full_model():
    cached, plain = _pair(LAST_LAYER)
    batch = _batch()
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    for model in (cached, plain):
        model.eval()
    for _ in range(2):  # the second pass reads the cache
        out_c, out_p = cached(**batch), plain(**batch)
        assert torch.allclose(out_c.logits, out_p.logits, atol=1e-5)
    out_c.loss.backward()
    out_p.loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in cached.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[name], atol=1e-5), name
    assert len(cached.base_model.model.bert.embeddings.memo) == len({tuple(r) for r in batch["input_ids"].tolist()})


def test_the_adapter_keeps_its_names_and_the_frozen_layers_no_dropout():
    cached, plain = _pair(LAST_LAYER)
    trained = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trained(cached) == trained(plain)
    assert any("layer.5.attention.self.query.lora_A" in n for n in trained(cached))
    cached.train()
    assert not cached.base_model.model.bert.embeddings.training
    assert cached.base_model.model.bert.encoder.layer[5].training


def test_a_texts_states_do_not_depend_on_the_longest_text_beside_it_whatever_the_pad_id():
    """RoBERTa pads with id 1, fedtune's collator with 0: the cache must still tell the padding apart,
    or a record's output (and its per-sample gradient under DP-SGD) would change with the longest
    record sampled into its batch."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedtune.models.prefix_cache import cache_frozen_prefix

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1, num_labels=2)
    model = get_peft_model(RobertaForSequenceClassification(config),
                           PeftLoraConfig(r=2, target_modules=["layer.1.attention.self.query",
                                                               "layer.1.attention.self.value"]))
    assert cache_frozen_prefix(model) == 1
    model.eval()
    short = (torch.tensor([0, 5, 6, 2]), torch.tensor(0))
    long = (torch.tensor([0, 7, 8, 9, 10, 11, 12, 2]), torch.tensor(1))
    with torch.no_grad():
        alone = model(**pad_batch([short])).logits[0]
        beside = model(**pad_batch([short, long])).logits[0]
    assert torch.allclose(alone, beside, atol=1e-6), (alone, beside)
