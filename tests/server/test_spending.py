"""The ledger's side of "ε never resets silently" (server/spending.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtune import constants as k
from fedtune.privacy.accountant import epsilon
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtune.server.spending import flag_lost_state, unnamed, with_recorded_spending

pytestmark = pytest.mark.usefixtures("flower_run")
DELTA = 1e-5


def entry(round_: int, history: list, status: str = "trained") -> LedgerEntry:
    return LedgerEntry(round_, status, "prv", num_examples=64, noise_multiplier=1.0, max_grad_norm=1.0,
                       sample_rate=0.25, steps=4 if status == "trained" else 0, delta=DELTA,
                       epsilon=epsilon("prv", history, DELTA))


def test_a_reported_epsilon_below_the_ledgers_recomputation_is_flagged():
    """The review's deleted state file: 4.39 -> 6.58 -> 4.39."""
    one, two = [(1.0, 0.25, 4)], [(1.0, 0.25, 8)]
    ledger = PrivacyLedger("prv", True, {
        "a": [entry(1, one), entry(2, two), entry(3, [(1.0, 0.25, 12)])],  # kept its state
        "b": [entry(1, one), entry(2, two), entry(3, one)]})  # restarted from nothing, reporting one round's ε
    assert flag_lost_state(ledger, 3, DELTA) == ["b"]
    flagged = ledger.clients["b"][-1]
    assert flagged.state_lost and flagged.epsilon_recomputed > flagged.epsilon
    assert flagged.to_dict()["state_lost"] is True and "epsilon_recomputed" in flagged.to_dict()
    assert not ledger.clients["a"][-1].state_lost and "state_lost" not in ledger.clients["a"][-1].to_dict()


def test_each_client_is_sent_only_its_own_recorded_spending():
    ledger = PrivacyLedger("prv", True, {"a": [entry(1, [(1.0, 0.25, 4)]), entry(2, [(1.0, 0.25, 8)])],
                                         "b": [entry(1, [(1.0, 0.25, 4)])]})
    shared = RecordDict({k.ARRAYS: ArrayRecord({"w": Array(np.zeros(2))}),
                         k.CONFIG: ConfigRecord({"x": 1})})
    messages = [Message(shared, dst_node_id=node, message_type="train") for node in (1, 2, 3)]
    with_recorded_spending(messages, ledger, {1: "a", 2: "b"})
    sent = [m.content[k.CONFIG].get(k.LEDGER_SPENT) for m in messages]
    assert json.loads(sent[0]) == [[1.0, 0.25, 8]]  # merged, as the client's accountant keeps it
    assert json.loads(sent[1]) == [[1.0, 0.25, 4]]
    assert sent[2] is None, "a node the server cannot name gets no one's record"
    assert k.LEDGER_SPENT not in shared[k.CONFIG], "the shared config is not changed for everyone"


def test_unknown_nodes_are_asked_who_they_are_only_when_the_ledger_has_someone_unplaced():
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (7, 8)]
    grid = SimpleNamespace(get_node_ids=lambda: [7, 8])
    assert unnamed(grid, messages, {}, PrivacyLedger("prv", True)) == [], "a fresh run: nothing to compare with"
    ledger = PrivacyLedger("prv", True, {"a": [entry(1, [(1.0, 0.25, 4)])]})
    assert unnamed(grid, messages, {7: "a"}, ledger) == [], "everyone on record is on a connected node"
    assert unnamed(grid, messages, {99: "a"}, ledger) == [7, 8], "a resumed simulation: every node is new"
