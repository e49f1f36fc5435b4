"""Audit canaries: a fair coin per canary, placed only in their clients' training data, never colliding
with the real data, and leaving the rest of the federation exactly as it was."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from fedtune.config import DataConfig, DPConfig, FedtuneConfig
from fedtune.data.canaries import CANARY_GROUP, plan_canaries
from fedtune.data.federated import federated_data
from fedtune.data.instruct import federated_instructions
from fedtune.errors import ConfigError

BASE = DataConfig(demo_examples=200)


def test_membership_is_a_fair_coin_per_canary_and_clients_are_uniform():
    plan = plan_canaries(4000, 5, 1, seed=0)
    members = sum(plan.members)
    assert abs(members - 2000) < 4 * 32  # Binomial(4000, 1/2): sd ~ 32
    per_client = Counter(c for c in plan.clients if c >= 0)
    assert sorted(per_client) == [0, 1, 2, 3, 4] and min(per_client.values()) > members / 5 - 100
    assert plan == plan_canaries(4000, 5, 1, seed=0)  # every process rebuilds the same plan
    assert plan != plan_canaries(4000, 5, 1, seed=1)


def test_member_canaries_join_their_clients_training_data_only():
    base = federated_data(BASE, 3, 0)
    fed = federated_data(dataclasses.replace(BASE, canaries=30, canary_repeats=3), 3, 0)
    plan, records = fed.canaries.plan, fed.canaries.records
    assert len(records) == 30 and len({text for text, _ in records}) == 30
    assert not {text for text, _ in records} & set(base.texts)  # no collision with the demo data
    assert fed.server_test == base.server_test
    for cid, (before, after) in enumerate(zip(base.clients, fed.clients, strict=True)):
        assert after.val == before.val and after.train[: len(before.train)] == before.train
        added = Counter(fed.select(after.train[len(before.train):])[0])
        assert added == {records[i][0]: 3 for i in plan.at_client(cid)}
    in_texts = {records[i][0] for i, member in enumerate(plan.members) if member}
    assert set(fed.texts[len(base.texts):]) == in_texts  # left-out canaries are nowhere in the data
    for text, label in zip(fed.texts, fed.labels, strict=True):
        if text in in_texts:
            assert label == dict(records)[text]


def test_causal_lm_canaries_are_rare_phrases_in_their_own_group():
    base = federated_instructions(BASE, 2, 0)
    fed = federated_instructions(dataclasses.replace(BASE, canaries=10), 2, 0)
    assert fed.group_names == (*base.group_names, CANARY_GROUP)
    chats, plan = fed.canaries.records, fed.canaries.plan
    answers = {chat.response for chat in chats}
    assert len(answers) == 10 and not answers & {chat.response for chat in base.chats}
    for cid, (before, after) in enumerate(zip(base.clients, fed.clients, strict=True)):
        assert fed.select(after.train[len(before.train):]) == [chats[i] for i in plan.at_client(cid)]
    assert fed.groups[len(base.chats):] == (len(base.group_names),) * sum(plan.members)


def test_repeated_canaries_are_refused_under_dp():
    with pytest.raises(ConfigError, match="data.canary_repeats"):
        FedtuneConfig(data=DataConfig(canaries=10, canary_repeats=2))
    FedtuneConfig(data=DataConfig(canaries=10, canary_repeats=2), dp=DPConfig(enabled=False))
    with pytest.raises(ConfigError, match="data.canaries"):
        DataConfig(canaries=-1)
