"""The causal-LM model: LoRA targets per architecture, frozen tied embeddings, a loss whose per-example
gradients are each example's own (what DP-SGD clips), DP steps that move LoRA, token-weighted evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedtune.client.train import train_round
from fedtune.config import DPConfig, FedtuneConfig, LoraConfig, ModelConfig, TrainConfig
from fedtune.data.chat import TokenizedChats, tokenize_chats
from fedtune.data.instruct import conversation, make_demo_instructions
from fedtune.data.text import IGNORE_INDEX, pad_batch
from fedtune.data.users import UserRecords
from fedtune.errors import ConfigError
from fedtune.models.adapter import trainable_state
from fedtune.models.build import load_tokenizer
from fedtune.models.causal import evaluate_lm, fresh_causal_model, per_sequence_loss
from fedtune.privacy.dpsgd import RoundSeeds, make_private
from tests.privacy.test_user_level import summed_after_one_step


def lm(path, **lora) -> torch.nn.Module:
    return fresh_causal_model(ModelConfig(task="causal-lm", name_or_path=str(path)), LoraConfig(r=2, **lora))


def adapted(model) -> set[str]:
    """Short names of the modules that carry LoRA."""
    return {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in trainable_state(model) if ".lora_A." in name}


@pytest.fixture(scope="module")
def chats(tiny_llama_dir) -> TokenizedChats:
    demo = make_demo_instructions(12, seed=0)
    return tokenize_chats(load_tokenizer(str(tiny_llama_dir)), [conversation(r) for r, _ in demo], max_length=64)


def test_lora_targets_follow_the_architecture_unless_named(tiny_llama_dir, tiny_model):
    assert adapted(lm(tiny_llama_dir)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapted(tiny_model) == {"query", "value"}  # BERT classification: as before
    assert adapted(lm(tiny_llama_dir, target_modules=("q_proj", "v_proj"))) == {"q_proj", "v_proj"}
    everything = adapted(lm(tiny_llama_dir, target_modules=("all-linear",)))
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= everything and "lm_head" not in everything
    with pytest.raises(ConfigError, match="no module called query.*q_proj"):
        lm(tiny_llama_dir, target_modules=("query",))


def test_tied_embeddings_stay_frozen_and_never_travel(tiny_llama_dir):
    model = lm(tiny_llama_dir)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight  # tied
    assert not base.get_input_embeddings().weight.requires_grad
    assert all(".lora_" in name for name in trainable_state(model))
    for embeddings in ("embed_tokens", "lm_head"):
        with pytest.raises(ConfigError, match="lora.modules_to_save"):
            lm(tiny_llama_dir, modules_to_save=(embeddings,))


def test_opacus_per_sample_gradients_are_each_examples_own(tiny_llama_dir, chats):
    """The per-example gradients DP-SGD clips must depend on that example alone. transformers' default
    loss (mean over all answer tokens of the batch) fails this when answers differ in length."""
    model = lm(tiny_llama_dir)
    with torch.no_grad():  # LoRA B starts at zero, which would make every LoRA A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    data = TokenizedChats(chats.input_ids[:3], chats.labels[:3])
    assert len({sum(y != IGNORE_INDEX for y in labels) for labels in data.labels}) > 1  # answers differ in length
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    alone = []
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        model(**pad_batch([data[i]])).loss.backward()
        alone.append({n: p.grad.clone() for n, p in params})
    model.zero_grad(set_to_none=True)
    private = make_private(model, torch.optim.SGD([p for _, p in params], lr=0.1), data, len(data), pad_batch,
                           DPConfig(), [], RoundSeeds.derived(0))
    try:
        model(**pad_batch([data[i] for i in range(len(data))])).loss.backward()  # 3-D activations in every layer
        for name, p in params:
            assert p.grad_sample.shape == (len(data), *p.shape)
            for i in range(len(data)):
                torch.testing.assert_close(p.grad_sample[i], alone[i][name], rtol=1e-4, atol=1e-6)
    finally:
        private.close()


def test_dp_sgd_moves_the_lora_weights(tiny_llama_dir, chats):
    model = lm(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = FedtuneConfig(model=ModelConfig(task="causal-lm", name_or_path=str(tiny_llama_dir)),
                        train=TrainConfig(batch_size=4, learning_rate=1e-2), dp=DPConfig(noise_multiplier=0.5))
    result = train_round(model, chats, cfg, [], 0.0, seed=1)
    assert result.steps > 0 and torch.isfinite(torch.tensor(result.loss)) and result.history
    after = dict(model.named_parameters())
    moved = [n for n, p in before.items() if not torch.equal(p, after[n])]
    assert len(moved) == len(before), "a LoRA weight did not change (Opacus #820)"


def test_evaluation_weights_every_answer_token_equally(tiny_llama_dir, chats):
    model = lm(tiny_llama_dir)
    data = TokenizedChats(chats.input_ids[:3], chats.labels[:3])
    total, tokens = 0.0, 0
    for ids, labels in (data[i] for i in range(len(data))):
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1]
        scored = labels[1:] != IGNORE_INDEX
        total += float(F.cross_entropy(logits[scored], labels[1:][scored], reduction="sum"))
        tokens += int(scored.sum())
    loss, accuracy = evaluate_lm(model, data, batch_size=2)  # padding inside a batch changes nothing
    assert loss == pytest.approx(total / tokens, rel=1e-4)
    assert 0.0 <= accuracy <= 1.0


def test_a_model_without_a_chat_template_is_refused_before_a_run(tiny_llama_dir):
    from fedtune.models.build import default_model_dir
    from fedtune.tasks.base import get_task

    def check_model(path: str, task: str) -> None:
        get_task(task).check_model(ModelConfig(task=task, name_or_path=path))

    check_model(str(tiny_llama_dir), "causal-lm")
    with pytest.raises(ConfigError, match="no chat template"):
        check_model(str(default_model_dir()), "causal-lm")  # MiniLM: an encoder with no chat template


def test_user_level_dp_sgd_clips_each_users_conversations_together(tiny_llama_dir, chats):
    """Causal LM under dp.unit `user`: one gradient per user of its conversations, clipped to C."""
    model = lm(tiny_llama_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = (tuple(range(8)), (8, 9), (10, 11))
    users = UserRecords(chats, groups)

    def summed_grad(clip: float):
        dp = DPConfig(unit="user", noise_multiplier=0.0, max_grad_norm=clip, max_records_per_user=16)
        return summed_after_one_step(model, users, dp)

    clipped, batch = summed_grad(1e-3)
    assert len(batch["input_ids"]) == 12 and "user_index" not in batch  # every conversation of the 3 users
    assert sum(float(g.pow(2).sum()) for g in clipped) ** 0.5 <= 3 * 1e-3 * (1 + 1e-4)
    unclipped, batch = summed_grad(1e6)  # the sum over users of each one's mean per-conversation loss gradient
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = [per_sequence_loss(logits[i:i + 1], batch["labels"][i:i + 1]) for i in range(12)]
    sum(torch.stack([losses[i] for i in group]).mean() for group in groups).backward()
    for got, p in zip(unclipped, params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-6)
    model.zero_grad(set_to_none=True)
