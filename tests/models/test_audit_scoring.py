"""The privacy audit's causal-LM scores: each canary's own mean loss over its answer tokens, and the
server's audit of a causal-LM run end to end on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config import DataConfig, FedtuneConfig, LoraConfig, ModelConfig
from fedtune.data.chat import tokenize_chats
from fedtune.data.instruct import conversation, federated_instructions, make_demo_instructions
from fedtune.data.text import pad_batch
from fedtune.models.adapter import trainable_state
from fedtune.models.build import load_tokenizer
from fedtune.models.causal import build_causal_model, example_lm_losses, fresh_causal_model
from fedtune.privacy.audit import AUDIT_FILE
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.audit import run_audit
from fedtune.server.run_dir import Checkpoint, RunDirectory


def test_example_lm_losses_are_each_conversations_training_loss(tiny_llama_dir):
    """The model's own loss (per_sequence_loss) on a batch of one is that conversation's score, and
    the mean over a batch is the batch's training loss."""
    model = fresh_causal_model(ModelConfig(task="causal-lm", name_or_path=str(tiny_llama_dir)), LoraConfig(r=2))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    chats = tokenize_chats(tokenizer, [conversation(r) for r, _ in make_demo_instructions(5, seed=3)], 64)
    losses = example_lm_losses(model, chats, batch_size=2)
    model.eval()
    with torch.no_grad():
        for i in range(len(chats)):
            assert losses[i] == pytest.approx(model(**pad_batch([chats[i]])).loss.item(), rel=1e-4)
        batch = pad_batch([chats[i] for i in range(len(chats))])
        assert sum(losses) / len(losses) == pytest.approx(model(**batch).loss.item(), rel=1e-4)


def test_a_causal_lm_run_is_audited_on_its_canaries(tiny_llama_dir, tmp_path):
    cfg = FedtuneConfig(rounds=1, clients=2, model=ModelConfig(task="causal-lm", name_or_path=str(tiny_llama_dir)),
                        lora=LoraConfig(r=2), data=DataConfig(demo_examples=40, partition="iid", canaries=16))
    run = RunDirectory.create(tmp_path / "run", cfg)
    model = build_causal_model(cfg.model, cfg.lora, seed=cfg.seed)
    ledger = {"accountant": "prv", "dp_enabled": True, "clients": {"a": [
        {"round": 1, "status": "trained", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.5,
         "steps": 2, "delta": 1e-5, "epsilon": 2.0, "epsilon_rdp": 2.1}]}, "client_level": None}
    PrivacyLedger.from_dict(ledger).save(run.path)  # as the round loop saves it, before committing
    run.commit(Checkpoint(1, trainable_state(model), [], ledger))
    record = run_audit(run, 0.95)
    assert json.loads((run.path / AUDIT_FILE).read_text()) == record
    assert record["task"] == "causal-lm" and record["canaries"] == 16 and record["epsilon_theoretical"] == 2.0
    canaries = federated_instructions(cfg.data, 2, 0).canaries
    scored = tokenize_chats(load_tokenizer(str(tiny_llama_dir)), canaries.records, cfg.model.max_length)
    assert record["canary_losses"] == pytest.approx(example_lm_losses(model, scored))
    assert record["consistent"] is (record["epsilon_lower_bound"] <= 2.0)
