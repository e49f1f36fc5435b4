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


def summed_after_one_step(model, users: UserRecords, dp: DPConfig):
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
    summed, batch = summed_after_one_step(tiny_model, many, dp)
    assert len(batch["labels"]) == 24 and _norm(summed) <= clip * (1 + 1e-4)
    if variant == "mean":  # clipping binds on the mean gradient; a mean of clipped ones may be shorter
        assert _norm(summed) == pytest.approx(clip, rel=1e-3)
    two = UserRecords(_records(tokenized, 24), (tuple(range(23)), (23,)))  # a user of 23 and a user of 1
    summed, _ = summed_after_one_step(tiny_model, two, dp)
    assert _norm(summed) <= 2 * clip * (1 + 1e-4)
    # the same 24 records as 24 users (record-level): 24 clipped gradients, more than one C
    apart = UserRecords(_records(tokenized, 24), tuple((i,) for i in range(24)))
    assert _norm(summed_after_one_step(tiny_model, apart, dp)[0]) > 3 * clip


def test_without_binding_clip_a_users_gradient_is_the_gradient_of_their_mean_loss(tiny_model, tokenized):
    users = ((0, 1, 2), (3, 4, 5, 6, 7))
    dp = DPConfig(unit="user", noise_multiplier=0.0, max_grad_norm=1e6, max_records_per_user=64)
    summed, batch = summed_after_one_step(tiny_model, UserRecords(_records(tokenized, 8), users), dp)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    torch.manual_seed(123)
    logits = tiny_model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    per_record = F.cross_entropy(logits, batch["labels"], reduction="none")
    (per_record[:3].mean() + per_record[3:].mean()).backward()
    expected = [p.grad.clone() for p in params]
    tiny_model.zero_grad(set_to_none=True)
    for got, want in zip(summed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_users_are_sampled_and_a_large_user_brings_at_most_k_distinct_records_of_their_own():
    records = TokenizedTexts(tuple((i,) for i in range(100)), (0,) * 100)  # a record's only token: its index
    users = UserRecords(records, (tuple(range(60)), *((i,) for i in range(60, 100))))  # 41 users
    loader = user_loader(users, 8, pad_batch, max_records=5, generator=torch.Generator().manual_seed(1),
                         records_generator=torch.Generator().manual_seed(2))
    assert len(loader) == math.ceil(41 / 8)  # q = 1/6 over users, 6 steps an epoch
    steps = sampled = big_seen = 0
    for _ in range(100):
        for batch in loader:
            steps += 1
            if batch is None:
                continue
            owners, ids = batch[USER_INDEX].tolist(), batch["input_ids"][:, 0].tolist()
            sampled += len(set(owners))
            by_slot = {slot: [i for i, o in zip(ids, owners, strict=True) if o == slot] for slot in set(owners)}
            for mine in by_slot.values():
                if mine[0] < 60:  # the large user: 5 of its own records, all different
                    assert len(mine) == len(set(mine)) == 5 and all(i < 60 for i in mine)
                    big_seen += 1
                else:
                    assert len(mine) == 1
    assert sampled / (steps * 41) == pytest.approx(1 / 6, rel=0.1) and big_seen > 50


def test_physical_batches_split_users_not_records_and_change_nothing(tiny_model, tokenized):
    """dp.physical_batch_size counts users: with one user per pass the update is the one of a whole batch."""
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    users = UserRecords(_records(tokenized, 12), ((0, 1, 2, 3, 4), (5, 6), (7,), (8, 9, 10, 11)))
    start = [p.detach().clone() for p in params]
    dropouts = [m for m in tiny_model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:  # the passes then differ only in how the batch is split (Opacus needs training mode)
        m.p = 0.0
    moved = []
    try:
        for physical in (0, 1):
            moved.append(_one_step_moves(tiny_model, params, start, users, physical))
    finally:
        for m, rate in zip(dropouts, rates, strict=True):
            m.p = rate
    for whole, split in zip(*moved, strict=True):
        torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-7)
    assert _norm(moved[0]) > 0


def _one_step_moves(model, params, start, users: UserRecords, physical: int) -> list[torch.Tensor]:
    """How one user-level DP-SGD step (σ = 0) moves the weights from `start`, with that physical batch size."""
    for p, value in zip(params, start, strict=True):
        p.data.copy_(value)
    dp = DPConfig(unit="user", noise_multiplier=0.0, max_grad_norm=0.05, physical_batch_size=physical)
    private = make_private(model, torch.optim.SGD(params, lr=1.0), users, len(users), pad_batch, dp, [],
                           RoundSeeds.derived(0))
    passes = 0
    try:
        for batch in private.batches():
            passes += 1
            assert USER_INDEX not in batch  # kept by PrivateTraining, not given to the model
            model(**batch).loss.backward()
            private.step()
    finally:
        private.close()
    assert private.steps == 1 and passes == (1 if physical == 0 else 4)
    return [p.detach() - value for p, value in zip(params, start, strict=True)]


def test_a_step_is_finite_where_opacus_would_divide_by_zero(tiny_model, tokenized):
    """n = 49 at B = 1: Opacus' expected batch size int(49 · (1/49)) is 0; fedtune's is 1."""
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    data = TokenizedTexts(tokenized.input_ids[:49], tokenized.labels[:49])
    private = make_private(tiny_model, torch.optim.SGD(params, lr=0.1), data, 1, pad_batch, DPConfig(), [],
                           RoundSeeds.derived(0))
    try:
        assert private.optimizer.expected_batch_size == 1
        batch = next(iter(private.batches()))
        tiny_model(**batch).loss.backward()
        private.step()
    finally:
        private.close()
    assert all(torch.isfinite(p).all() for p in params)


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
