"""model.pooling = "mean": the head reads the mean of the real tokens' states, and it trains under DP-SGD."""

import dataclasses

import pytest
import torch

from fedtune.client.train import train_round
from fedtune.config import DPConfig, LoraConfig, ModelConfig, TrainConfig
from fedtune.data.demo import LABELS
from fedtune.errors import ConfigError
from fedtune.models.adapter import load_record, to_record
from fedtune.models.build import build_model, load_tokenizer
from fedtune.models.evaluate import evaluate
from fedtune.models.pooling import use_mean_pooling

MEAN = ModelConfig(pooling="mean")
LAST_LAYER = LoraConfig(r=2, alpha=4.0, modules_to_save=(),
                        target_modules=("layer.5.attention.self.query", "layer.5.attention.self.value"))


@pytest.fixture
def mean_model():
    """The process-cached model; its trainable weights are restored after each test."""
    model = build_model(MEAN, LAST_LAYER, num_labels=len(LABELS), seed=0)
    saved = to_record(model)
    yield model
    load_record(model, saved)


def _logits(model, texts, pad_to=None):
    tokenizer = load_tokenizer("")
    enc = tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def test_padding_does_not_change_the_prediction(mean_model):
    text = "Operating profit rose to EUR 13.1 mn."
    alone = _logits(mean_model, [text])
    padded = _logits(mean_model, [text, "a much longer neighbour " * 6], pad_to=64)[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_head_reads_the_masked_mean_of_the_last_layer(mean_model):
    tokenizer = load_tokenizer("")
    enc = tokenizer(["Sales fell.", "The company reported record quarterly sales."], padding=True,
                    return_tensors="pt")
    inner = mean_model.base_model.model
    inner.eval()
    with torch.no_grad():
        states = inner.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        expected = inner.classifier((states * mask).sum(1) / mask.sum(1))
        got = mean_model(**enc).logits
    torch.testing.assert_close(got, expected)
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # the first text was padded


def test_only_last_layer_lora_and_head_train(mean_model):
    trained = [n for n, p in mean_model.named_parameters() if p.requires_grad]
    assert trained and all("layer.5" in n or "classifier" in n for n in trained)
    assert not any("pooler" in n for n, _ in mean_model.named_parameters())  # mean pooling has no weights


def test_dp_sgd_with_plain_sgd_moves_lora_and_learns(mean_model, tokenized, tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg, model=MEAN, lora=LAST_LAYER,
        train=TrainConfig(optimizer="sgd", learning_rate=2.0, batch_size=4096, local_epochs=1),
        dp=DPConfig(noise_multiplier=0.5, max_grad_norm=1.0))
    start = {n: p.detach().clone() for n, p in mean_model.named_parameters() if p.requires_grad}
    loss_before, _ = evaluate(mean_model, tokenized)
    history = []
    for seed in range(4):
        result = train_round(mean_model, tokenized, cfg, history, proximal_mu=0.0, seed=seed)
        history = result.history
    loss_after, _ = evaluate(mean_model, tokenized)
    assert result.sample_rate == 1.0 and result.steps == 1  # one full-batch step per round
    moved = {n for n, p in mean_model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])}
    assert any("lora_B" in n for n in moved) and any("classifier" in n for n in moved)
    assert loss_after < loss_before


def test_mean_pooling_needs_a_pooler_slot():
    class NoPooler(torch.nn.Module):
        base_model_prefix = "encoder"

        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="model.pooling"):
        use_mean_pooling(NoPooler())


def test_pooling_is_validated():
    with pytest.raises(ConfigError, match="model.pooling"):
        ModelConfig(pooling="max")


def test_mean_pooling_is_refused_for_a_causal_lm_before_anything_runs():
    from fedtune.config import FedtuneConfig
    from fedtune.server.prepare import preflight

    with pytest.raises(ConfigError, match="model.pooling"):
        preflight(FedtuneConfig(model=ModelConfig(pooling="mean", task="causal-lm")))


@pytest.mark.parametrize(("kwargs", "ok"), [
    (dict(optimizer="sgd", learning_rate=3.0), True),
    (dict(optimizer="adamw", learning_rate=3.0), False),
    (dict(optimizer="sgd", learning_rate=500.0), False),
    (dict(optimizer="lbfgs"), False),
])
def test_optimizer_and_its_learning_rate_are_validated(kwargs, ok):
    if ok:
        TrainConfig(**kwargs)
    else:
        with pytest.raises(ConfigError, match="train.optimizer|train.learning_rate"):
            TrainConfig(**kwargs)


def test_preflight_checks_that_the_model_can_mean_pool(tmp_path):
    from transformers import DistilBertConfig

    from fedtune.tasks.base import get_task

    def check_model(path: str, task: str, pooling: str) -> None:
        get_task(task).check_model(ModelConfig(task=task, name_or_path=path, pooling=pooling))

    check_model("", "classification", "mean")  # the default MiniLM (BERT) can
    from transformers import DistilBertForSequenceClassification

    from fedtune.models.build import load_tokenizer

    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    load_tokenizer("").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.pooling.*DistilBertForSequenceClassification"):
        check_model(str(tmp_path), "classification", "mean")  # its head reads the first token itself
    check_model(str(tmp_path), "classification", "cls")
