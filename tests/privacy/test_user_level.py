"""User-level DP-SGD (dp.unit `user`): users are Poisson-sampled, each sampled user brings at most k
records, and one user's whole contribution to a step is clipped to C however many records they have;
ε is the subsampled Gaussian's over users, as an independent accountant computes it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fedtune.client.train import train_round
from fedtune.config import DataConfig, DPConfig
from fedtune.data.text import TokenizedTexts, pad_batch
from fedtune.data.users import UserRecords
from fedtune.privacy.dpsgd import USER_INDEX, RoundSeeds, make_private, user_loader
from fedtune.privacy.independent import independent_epsilon


def _records(data: TokenizedTexts, n: int) -> TokenizedTexts:
    return TokenizedTexts(data.input_ids[:n], data.labels[:n])


def _summed_after_one_step(model, users: UserRecords, dp: DPConfig):
    """(Σ over the sampled users of their clipped gradients, the batch) for one step that samples
    every user (q = 1): Opacus' pre-step clips and sums exactly what PrivateTraining.step hands it."""
    params = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(params, lr=0.1), users, len(users), pad_batch, dp, [],
                           RoundSeeds.derived(0))
    try:
        batch = next(iter(private.batches()))
        torch.manual_seed(123)  # the same dropout masks as the reference computation
        model(**batch).loss.backward()
        private.upcast_grad_samples()
        private.combine_by_user()  # as PrivateTraining.step does before the optimizer
        private.optimizer.pre_step()
        summed = [p.summed_grad.clone() for p in params]
        private.optimizer.zero_grad(set_to_none=True)
    finally:
        private.close()
    return summed, batch


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


@pytest.mark.parametrize("variant", ["mean", "clipped_mean"])
def test_a_users_whole_contribution_is_clipped_to_C_however_many_records(tiny_model, tokenized, variant):
    clip = 0.01  # far below any gradient's norm, so clipping binds
    dp = DPConfig(unit="user", noise_multiplier=0.0, max_grad_norm=clip, max_records_per_user=64,
                  user_gradient=variant)
    many = UserRecords(_records(tokenized, 24), (tuple(range(24)),))  # one user with 24 records
    summed, batch = _summed_after_one_step(tiny_model, many, dp)
    assert len(batch["labels"]) == 24 and _norm(summed) <= clip * (1 + 1e-4)
    if variant == "mean":  # clipping binds on the mean gradient; a mean of clipped ones may be shorter
        assert _norm(summed) == pytest.approx(clip, rel=1e-3)
    two = UserRecords(_records(tokenized, 24), (tuple(range(23)), (23,)))  # a user of 23 and a user of 1
    summed, _ = _summed_after_one_step(tiny_model, two, dp)
    assert _norm(summed) <= 2 * clip * (1 + 1e-4)
    # the same 24 records as 24 users (record-level): 24 clipped gradients, more than one C
    apart = UserRecords(_records(tokenized, 24), tuple((i,) for i in range(24)))
    assert _norm(_summed_after_one_step(tiny_model, apart, dp)[0]) > 3 * clip


def test_without_binding_clip_a_users_gradient_is_the_gradient_of_their_mean_loss(tiny_model, tokenized):
    users = ((0, 1, 2), (3, 4, 5, 6, 7))
    dp = DPConfig(unit="user", noise_multiplier=0.0, max_grad_norm=1e6, max_records_per_user=64)
    summed, batch = _summed_after_one_step(tiny_model, UserRecords(_records(tokenized, 8), users), dp)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    torch.manual_seed(123)
    logits = tiny_model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    per_record = F.cross_entropy(logits, batch["labels"], reduction="none")
    (per_record[:3].mean() + per_record[3:].mean()).backward()
    expected = [p.grad.clone() for p in params]
    tiny_model.zero_grad(set_to_none=True)
    for got, want in zip(summed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_users_are_sampled_and_a_large_user_brings_at_most_k_records():
    records = TokenizedTexts(tuple((i % 7 + 1,) for i in range(100)), (0,) * 100)
    users = UserRecords(records, (tuple(range(60)), *((i,) for i in range(60, 100))))  # 41 users
    loader = user_loader(users, 8, pad_batch, max_records=5, generator=torch.Generator().manual_seed(1))
    assert len(loader) == math.ceil(41 / 8)  # q = 1/6 over users, 6 steps an epoch
    sampled = []
    for batch in loader:
        if batch is None:
            continue
        owners = batch[USER_INDEX].tolist()
        assert max(owners.count(slot) for slot in set(owners)) <= 5
        sampled.append(len(set(owners)))
    assert sum(sampled) > 0 and max(sampled) < 41


def test_epsilon_is_accounted_over_users_and_matches_an_independent_accountant(tiny_model, tokenized, tiny_cfg):
    users = UserRecords(_records(tokenized, 40), tuple(tuple(range(i, i + 4)) for i in range(0, 40, 4)))  # 10 users
    cfg = dataclasses.replace(tiny_cfg, dp=DPConfig(unit="user", noise_multiplier=1.0, accountant="prv"),
                              train=dataclasses.replace(tiny_cfg.train, batch_size=4, local_epochs=2),
                              data=DataConfig(path="notes.csv", user_column="patient_id"))
    result = train_round(tiny_model, users, cfg, [], proximal_mu=0.0, seed=0)
    q, steps = 1 / math.ceil(10 / 4), 2 * math.ceil(10 / 4)  # q over the 10 users, not the 40 records
    assert result.history == [(1.0, pytest.approx(q), steps)]
    from fedtune.privacy.accountant import epsilon

    assert epsilon("prv", result.history, 1e-5) == pytest.approx(
        independent_epsilon("prv", [(1.0, q, steps)], 1e-5), rel=0.01)
