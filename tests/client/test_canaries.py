"""Gradient canaries (data.canary_kind `gradient`): a canary record contributes C·u_j to its batch in
place of its own gradient under DP-SGD (so it is clipped and noised like any record), and in addition
to it without DP; every client finds exactly the canaries the plan put there."""

import dataclasses

import pytest
import torch

from fedtune.client.canaries import GradientCanaries
from fedtune.client.train import train_round
from fedtune.config import DataConfig, DPConfig, TrainConfig
from fedtune.data.canaries import gradient_direction

CANARY, ROW = 7, 3  # record ROW of the client's data is gradient canary CANARY


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _update(model, data, cfg, canaries) -> torch.Tensor:
    """The flattened change of the trainable weights after one round from the model's current weights."""
    start = [p.detach().clone() for p in _trainable(model)]
    train_round(model, data, cfg, [], proximal_mu=0.0, seed=0, canaries=canaries)
    change = torch.cat([(p.detach() - s).flatten() for p, s in zip(_trainable(model), start, strict=True)])
    with torch.no_grad():
        for p, s in zip(_trainable(model), start, strict=True):
            p.copy_(s)
    return change


def _one_full_batch_step(tiny_cfg, tokenized, dp: DPConfig):
    return dataclasses.replace(tiny_cfg, dp=dp, train=TrainConfig(batch_size=len(tokenized), learning_rate=1.0,
                                                                     optimizer="sgd"))


def test_without_dp_a_gradient_canary_adds_its_share_of_the_mean_gradient(tiny_model, tokenized, tiny_cfg):
    cfg = _one_full_batch_step(tiny_cfg, tokenized, DPConfig(enabled=False, max_grad_norm=0.5))
    rows = tuple(CANARY if i == ROW else -1 for i in range(len(tokenized)))
    plain = _update(tiny_model, tokenized, cfg, None)
    planted = _update(tiny_model, tokenized, cfg, GradientCanaries(rows, seed=0, norm=0.5))
    u = torch.from_numpy(gradient_direction(0, CANARY, plain.numel()))
    # one SGD step at lr 1 on the mean over the batch: the canary adds -(C/B)·u, nothing else changes
    torch.testing.assert_close(planted - plain, -0.5 * u / len(tokenized), atol=1e-6, rtol=0)


def test_under_dp_a_gradient_canary_replaces_its_record_and_is_clipped_like_one(tiny_model, tokenized, tiny_cfg):
    """σ = 0 and q = 1 (one step on every record): the two updates differ by the canary row alone,
    -(C·u − clip_C(g_row)) / B, so adding back C·u / B leaves at most one clipped gradient's share."""
    C = 0.5
    cfg = _one_full_batch_step(tiny_cfg, tokenized, DPConfig(noise_multiplier=0.0, max_grad_norm=C))
    rows = tuple(CANARY if i == ROW else -1 for i in range(len(tokenized)))
    plain = _update(tiny_model, tokenized, cfg, None)
    planted = _update(tiny_model, tokenized, cfg, GradientCanaries(rows, seed=0, norm=C))
    B = len(tokenized)
    u = torch.from_numpy(gradient_direction(0, CANARY, plain.numel()))
    replaced = (planted - plain) + C * u / B  # = clip_C(g_row) / B: the record's own gradient, taken out
    assert replaced.norm() <= C / B * (1 + 1e-4), "the record's own gradient is gone, clipped to C"
    assert replaced.norm() > 0.01 * C / B, "and it was there before: the canary replaced it, not added to it"
    along = float(-(planted - plain) @ u)
    assert along == pytest.approx(C / B, rel=0.1), "the step moves C/B along −u (ordinary data is ~orthogonal)"


def test_a_canary_larger_than_c_is_clipped_to_c(tiny_model, tokenized, tiny_cfg):
    """The injected gradient goes through Opacus' clipping: a canary of norm 10·C moves the update as
    far as one of norm C."""
    C = 0.5
    cfg = _one_full_batch_step(tiny_cfg, tokenized, DPConfig(noise_multiplier=0.0, max_grad_norm=C))
    rows = tuple(CANARY if i == ROW else -1 for i in range(len(tokenized)))
    at_c = _update(tiny_model, tokenized, cfg, GradientCanaries(rows, seed=0, norm=C))
    above = _update(tiny_model, tokenized, cfg, GradientCanaries(rows, seed=0, norm=10 * C))
    torch.testing.assert_close(above, at_c, atol=1e-6, rtol=1e-4)


def test_directions_are_public_unit_vectors_and_nearly_orthogonal():
    a, b = gradient_direction(3, 0, 20_000), gradient_direction(3, 1, 20_000)
    assert abs(float((a * a).sum()) - 1) < 1e-5 and (a == gradient_direction(3, 0, 20_000)).all()
    assert abs(float((a * b).sum())) < 0.05 and not (a == gradient_direction(4, 0, 20_000)).all()


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_every_client_finds_exactly_the_canaries_planted_there(task):
    from fedtune.tasks.base import get_task

    fed = get_task(task).federation(get_task(task).resolve_data(DataConfig(demo_examples=120, canaries=40)), 4, 2)
    records = fed.texts if task == "classification" else fed.chats
    plan = fed.canaries.plan
    for cid, split in enumerate(fed.clients):
        rows = fed.canaries.at_rows(split.train)
        assert sorted(r for r in rows if r >= 0) == plan.at_client(cid)
        for index, canary in zip(split.train, rows, strict=True):  # each canary row holds that canary's record
            if canary >= 0:
                planted = fed.canaries.records[canary]
                assert (planted[0] if task == "classification" else planted) == records[index]
