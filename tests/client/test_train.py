"""Local training learns, and FedProx keeps the client near the global weights."""

import dataclasses
import math

import pytest
import torch

from fedtune.client.train import train_round
from fedtune.config import DPConfig, FedtuneConfig, TrainConfig
from fedtune.data.text import TokenizedTexts
from fedtune.models.evaluate import evaluate
from fedtune.privacy.accountant import epsilon
from tests.privacy.noise_only import NoiseOnly


@pytest.mark.parametrize("length_buckets", [False, True])
def test_local_training_without_dp_improves_accuracy(tiny_model, tokenized, tiny_cfg, length_buckets):
    cfg = dataclasses.replace(tiny_cfg, dp=DPConfig(enabled=False),
                              train=TrainConfig(batch_size=8, learning_rate=3e-3, local_epochs=4,
                                                length_buckets=length_buckets))
    loss_before, acc_before = evaluate(tiny_model, tokenized)
    result = train_round(tiny_model, tokenized, cfg, [], proximal_mu=0.0, seed=0)
    loss_after, acc_after = evaluate(tiny_model, tokenized)
    assert result.steps == 4 * 8
    assert result.history == [(0.0, 1 / 8, 32)], "steps without noise are on record"
    assert math.isinf(epsilon("prv", result.history, 1e-5)), "so the client's ε is infinite from then on"
    assert loss_after < loss_before and acc_after > acc_before


def test_fedprox_stays_closer_to_the_global_weights(tiny_model, tokenized, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, dp=DPConfig(enabled=False))
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if p.requires_grad}

    def drift(mu: float) -> float:
        with torch.no_grad():
            for n, p in tiny_model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
        train_round(tiny_model, tokenized, cfg, [], proximal_mu=mu, seed=0)
        trained = [(n, p) for n, p in tiny_model.named_parameters() if p.requires_grad]
        return sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in trained)

    assert drift(5.0) < drift(0.0)


def test_physical_batches_split_memory_not_privacy(tiny_model, tokenized, tiny_cfg):
    """BatchMemoryManager caps every forward pass; the logical steps and the ε spent stay the same."""
    dp = DPConfig(noise_multiplier=1.0, physical_batch_size=0)
    cfg = dataclasses.replace(tiny_cfg, dp=dp, train=TrainConfig(batch_size=32, learning_rate=3e-3))
    whole = train_round(tiny_model, tokenized, cfg, [], proximal_mu=0.0, seed=0)
    sizes = []
    hook = tiny_model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(len(kw["input_ids"])),
                                                with_kwargs=True)
    try:
        capped = dataclasses.replace(cfg, dp=dataclasses.replace(dp, physical_batch_size=5))
        split = train_round(tiny_model, tokenized, capped, [], proximal_mu=0.0, seed=0)
    finally:
        hook.remove()
    assert max(sizes) <= 5 and len(sizes) > split.steps, "logical batches were split into physical ones"
    assert split.steps == whole.steps == 2 and split.history == whole.history


def test_dp_training_under_bf16_autocast_clips_in_fp32_and_moves_lora(tiny_model, tokenized, tiny_cfg, monkeypatch):
    """What `--device cuda` runs (bf16 autocast around the forward pass), here on the CPU: the
    forward really is bf16, Opacus clips fp32 per-sample gradients, and every LoRA matrix moves."""
    from opacus.optimizers import DPOptimizer

    import fedtune.client.train as train_module

    monkeypatch.setattr(train_module, "_mixed_precision", lambda _device: torch.autocast("cpu", dtype=torch.bfloat16))
    logits, clipped = set(), set()
    clip_and_accumulate = DPOptimizer.clip_and_accumulate

    def spy(optimizer):
        clipped.update(g.dtype for g in optimizer.grad_samples)
        return clip_and_accumulate(optimizer)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    cfg = dataclasses.replace(tiny_cfg, dp=DPConfig(noise_multiplier=1.0))
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if "lora_" in n}
    hook = tiny_model.register_forward_hook(lambda _m, _args, out: logits.add(out.logits.dtype))
    try:
        result = train_round(tiny_model, tokenized, cfg, [], proximal_mu=0.0, seed=0)
    finally:
        hook.remove()
    assert logits == {torch.bfloat16} and clipped == {torch.float32}
    lora = {n: p for n, p in tiny_model.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lora.values())
    assert all(not torch.equal(p, before[n]) for n, p in lora.items())
    assert result.steps > 0 and result.history


@pytest.mark.parametrize("dp, kind", [(DPConfig(enabled=False), "PlainTraining"),
                                      (DPConfig(noise_multiplier=1.0, delta=1e-3), "PrivateTraining")])
def test_one_loop_trains_with_or_without_dp(monkeypatch, dp, kind):
    """train_round asks the training object for batches and steps; which object it is (the one
    choice, in _training) decides DP, and both report ceil(n/B) steps per epoch into the history."""
    import fedtune.client.train as train_module

    made = []
    choose = train_module._training
    monkeypatch.setattr(train_module, "_training", lambda *args: made.append(choose(*args)) or made[-1])
    data = TokenizedTexts(tuple((i % 4,) for i in range(10)), (0,) * 10)
    cfg = FedtuneConfig(clients=1, dp=dp, train=TrainConfig(batch_size=4, local_epochs=3))
    result = train_round(NoiseOnly(), data, cfg, [(2.0, 0.5, 1)], proximal_mu=0.0, seed=0)
    assert [type(t).__name__ for t in made] == [kind]
    assert result.steps == made[0].steps == 3 * math.ceil(10 / 4)
    assert result.sample_rate == pytest.approx(1 / 3)
    assert result.history == [(2.0, 0.5, 1), (dp.noise_multiplier if dp.enabled else 0.0, result.sample_rate, 9)]


def test_fedprox_follows_every_real_step_of_either_object(monkeypatch):
    """The proximal step hangs on the optimizer's step, so it follows each step either object takes:
    once per logical batch under physical batches, and after noise-only steps on empty batches."""
    import fedtune.client.train as train_module

    calls = []
    monkeypatch.setattr(train_module, "proximal_step", lambda *args: calls.append(1))
    data = TokenizedTexts(tuple((i % 4,) for i in range(10)), (0,) * 10)
    for dp in (DPConfig(enabled=False), DPConfig(noise_multiplier=1.0, delta=1e-3, physical_batch_size=1)):
        calls.clear()
        model = NoiseOnly()
        cfg = FedtuneConfig(clients=1, dp=dp, train=TrainConfig(batch_size=4, local_epochs=2))
        result = train_round(model, data, cfg, [], proximal_mu=1.0, seed=0)
        assert len(calls) == result.steps == 6
        if dp.enabled:
            assert len(model.batches) > result.steps, "logical batches were split into physical ones"

