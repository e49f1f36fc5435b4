"""A node that never replies, or cannot be reached, fails alone: the round goes on without it,
and the ledger says why."""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from rich.console import Console
from rich.progress import Progress

from fedtune import constants as k
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtune.server.rounds import NO_REPLY, NOT_SENT, exchange, failed_reply, record_privacy

pytestmark = pytest.mark.usefixtures("in_flower_run")

SUPERLINK_NODE_ID = 1  # Flower's: the sender of the errors the SuperLink makes itself
METRICS = {k.NUM_EXAMPLES: 10, k.TRAIN_LOSS: 1.0, k.STEPS: 2, k.SAMPLE_RATE: 0.5, k.NOISE_MULTIPLIER: 1.0,
           k.MAX_GRAD_NORM: 1.0, k.DELTA: 1e-5, k.EPSILON: 1.5, k.EPSILON_OTHER: 1.6}


class FakeGrid:
    """Answers for the nodes in `answering`; the others stay silent. Node ids in `unreachable`
    are refused at push time, as a real grid does by returning None for them."""

    def __init__(self, answering: set[int], unreachable: frozenset[int] = frozenset(),
                 unavailable: frozenset[int] = frozenset(), metrics: dict | None = None):
        self.answering, self.unreachable, self.unavailable = answering, unreachable, unavailable
        self.metrics = METRICS if metrics is None else metrics
        self.inbox: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's grids do
            if msg.metadata.dst_node_id in self.unreachable:
                ids.append(None)
                continue
            self.inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for message_id in list(message_ids):
            msg = self.inbox.get(message_id)
            if msg is not None and msg.metadata.dst_node_id in self.unavailable:
                del self.inbox[message_id]  # the SuperLink answers for a node whose heartbeat lapsed
                error = Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as the SuperLink sets it
                out.append(error)
            elif msg is not None and msg.metadata.dst_node_id in self.answering:
                del self.inbox[message_id]
                content = RecordDict({k.METRICS: MetricRecord(self.metrics), k.CLIENT_INFO: ConfigRecord(
                    {k.CLIENT_NAME: f"clinic-{msg.metadata.dst_node_id}", k.STATUS: k.STATUS_TRAINED})})
                out.append(Message(content, reply_to=msg))
        return out


def instructions(nodes) -> list[Message]:
    return [Message(RecordDict({k.CONFIG: ConfigRecord({"n": n})}), dst_node_id=n, message_type="train")
            for n in nodes]


def test_a_reply_that_comes_during_the_last_wait_before_the_deadline_counts(monkeypatch):
    """The wait between pulls can end past the deadline (a loaded machine); a reply that came meanwhile
    is collected once more before the silent nodes are failed."""
    import fedtune.server.rounds as rounds

    grid = FakeGrid(answering=set())
    sleep = time.sleep

    def slow_sleep(seconds):  # the reply arrives while the loop sleeps through its deadline
        sleep(0.3)
        grid.answering.add(1)

    monkeypatch.setattr(rounds.time, "sleep", slow_sleep)
    with Progress(disable=True) as progress:
        replies = exchange(grid, instructions([1]), "train", progress, timeout_s=0.1)
    assert not replies[0].has_error() and replies[0].metadata.src_node_id == 1


def test_a_silent_node_gets_a_failed_reply_at_the_timeout_and_the_others_count():
    grid = FakeGrid(answering={1, 2})
    started = time.monotonic()
    with Progress(disable=True) as progress:
        replies = exchange(grid, instructions([1, 2, 3]), "train", progress, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert set(by_node) == {1, 2, 3}
    assert not by_node[1].has_error() and not by_node[2].has_error()
    assert by_node[3].has_error() and by_node[3].error.reason == NO_REPLY


class CountingGrid(FakeGrid):
    """A FakeGrid that records the most messages it ever held unanswered at once."""

    most_in_flight = 0

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        self.most_in_flight = max(self.most_in_flight, len(self.inbox))
        return ids


def test_a_limit_on_messages_in_flight_still_answers_every_message():
    """Simulation keeps only a few messages in flight (in_flight_limit); every node still gets
    its message and its reply, and a node the grid cannot reach still fails at once."""
    grid = CountingGrid(answering=set(range(1, 8)), unreachable=frozenset({8}))
    with Progress(disable=True) as progress:
        replies = exchange(grid, instructions(range(1, 9)), "train", progress, timeout_s=5, max_in_flight=2)
    assert grid.most_in_flight == 2
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == list(range(1, 8))
    assert [(r.metadata.src_node_id, r.error.reason) for r in replies if r.has_error()] == [(8, NOT_SENT)]


def test_messages_never_sent_before_the_timeout_fail_with_the_timeout_reason():
    grid = CountingGrid(answering=set())  # nobody answers: the first two wait, the rest are never pushed
    with Progress(disable=True) as progress:
        replies = exchange(grid, instructions([1, 2, 3, 4]), "train", progress, timeout_s=0.3, max_in_flight=2)
    assert grid.most_in_flight == 2
    assert sorted((r.metadata.src_node_id, r.error.reason) for r in replies) == [(n, NO_REPLY) for n in (1, 2, 3, 4)]


def test_a_reply_with_a_malformed_epsilon_does_not_stop_the_exchange():
    grid = FakeGrid(answering={1}, metrics={**METRICS, k.EPSILON: [1.0, 2.0]})
    with Progress() as progress:  # enabled: the progress line reads each reply's ε
        replies = exchange(grid, instructions([1]), "train", progress, timeout_s=5)
    assert len(replies) == 1 and not replies[0].has_error()  # rejected later, by server/validate.py


def test_a_node_the_grid_cannot_reach_fails_at_once():
    grid = FakeGrid(answering={1, 2}, unreachable=frozenset({2}))
    with Progress(disable=True) as progress:
        replies = exchange(grid, instructions([1, 2]), "train", progress, timeout_s=None)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[1].has_error() and by_node[2].error.reason == NOT_SENT


def test_an_error_the_superlink_makes_is_attributed_to_the_node_it_is_about():
    grid = FakeGrid(answering={2}, unavailable=frozenset({3}))
    with Progress(disable=True) as progress:
        replies = exchange(grid, instructions([2, 3]), "train", progress, timeout_s=5)
    failed = [r for r in replies if r.has_error()]
    assert [(r.metadata.src_node_id, r.error.reason, r.error.code) for r in failed] == [(3, "Node Unavailable", 5)]
    ledger = PrivacyLedger("prv", True)
    record_privacy(ledger, 1, replies, {3: "clinic-3"})
    assert ledger.clients["clinic-3"] == (LedgerEntry(1, k.STATUS_FAILED, "prv", reason="Node Unavailable"),)
    assert "node-1" not in ledger.clients


def test_failures_are_in_the_ledger_and_join_the_client_once_its_name_is_known():
    ledger, names = PrivacyLedger("prv", True), {}
    with Progress(disable=True) as progress:
        round1 = exchange(FakeGrid(answering={1}), instructions([1, 7]), "train", progress, timeout_s=0.2)
        record_privacy(ledger, 1, round1, names)
        assert ledger.clients["node-7"] == (LedgerEntry(1, k.STATUS_FAILED, "prv", reason=NO_REPLY),)
        round2 = exchange(FakeGrid(answering={1, 7}), instructions([1, 7]), "train", progress, timeout_s=5)
        record_privacy(ledger, 2, round2, names)
    assert "node-7" not in ledger.clients
    assert [(e.round, e.status) for e in ledger.clients["clinic-7"]] == [(1, "failed"), (2, "trained")]
    assert [(e.round, e.status) for e in ledger.clients["clinic-1"]] == [(1, "trained"), (2, "trained")]


def test_a_refused_update_is_left_out_but_its_spent_epsilon_stays_in_the_ledger():
    """Node 2's update has a NaN: it trained (and spent ε 1.5), so the ledger says `rejected`
    with that ε. Node 3's metrics are unusable too: nothing trustworthy to record, so `failed`."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from rich.console import Console

    from fedtune.server.rounds import _refuse_malformed

    reference = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    sent = instructions([1, 2, 3])
    FakeGrid(answering=set()).push_messages(sent)
    no_epsilon = {key: value for key, value in METRICS.items() if key != k.EPSILON}
    replies = []
    for msg, values, metrics in zip(sent, ([1.0, 2.0, 3.0], [1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]),
                                    (METRICS, METRICS, no_epsilon), strict=True):
        content = RecordDict({k.METRICS: MetricRecord(metrics), k.ARRAYS: ArrayRecord(
            {"w": Array(np.array(values, dtype=np.float32))}), k.CLIENT_INFO: ConfigRecord(
            {k.CLIENT_NAME: f"clinic-{msg.metadata.dst_node_id}", k.STATUS: k.STATUS_TRAINED})})
        replies.append(Message(content, reply_to=msg))
    console = Console(record=True, width=200)
    checked, refused = _refuse_malformed(replies, reference, sent, 1, console)
    assert [(r.metadata.src_node_id, r.has_error()) for r in checked] == [(1, False), (2, True), (3, True)]
    assert "w has NaN or Inf" in checked[1].error.reason and "metrics lack epsilon" in checked[2].error.reason
    assert "rejected the update from node 2: w has NaN or Inf values" in console.export_text()
    assert set(refused) == {2}
    ledger = PrivacyLedger("prv", True)
    record_privacy(ledger, 1, checked, {}, refused)
    (entry,) = ledger.clients["clinic-2"]
    assert (entry.status, entry.epsilon, entry.steps) == ("rejected", 1.5, 2)
    assert entry.reason.startswith("update rejected: w has NaN")
    assert [e.status for e in ledger.clients["node-3"]] == ["failed"]
    assert ledger.epsilon_max() == 1.5


def test_the_whole_traceback_goes_to_the_failures_log_and_one_line_to_the_ledger(tmp_path):
    from fedtune.privacy.ledger import PrivacyLedger
    from fedtune.server.rounds import FAILURES_LOG, _log_failures

    sent = Message(RecordDict(), dst_node_id=3, message_type="train")
    sent.metadata.__dict__["_message_id"] = "m3"
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nMemoryError: worker killed"
    replies = [failed_reply(sent, trace), failed_reply(sent, NO_REPLY)]
    for reply in replies:
        reply.metadata.__dict__["_src_node_id"] = 3
    ledger = PrivacyLedger("rdp", True)
    record_privacy(ledger, 1, replies, {3: "clinic-c"})
    _log_failures(tmp_path / FAILURES_LOG, 1, replies, {3: "clinic-c"})
    assert [e.reason for e in ledger.entries("clinic-c")] == ["MemoryError: worker killed", NO_REPLY]
    assert (tmp_path / FAILURES_LOG).read_text() == f"--- round 1, clinic-c\n{trace}\n"


def _late_reply(node: int, late: list[dict], status: str = k.STATUS_TRAINED) -> Message:
    metrics = MetricRecord({k.NUM_EXAMPLES: 64, k.NOISE_MULTIPLIER: 1.0, k.MAX_GRAD_NORM: 1.0, k.SAMPLE_RATE: 0.25,
                            k.STEPS: 4, k.DELTA: 1e-5, k.EPSILON: 2.0, k.EPSILON_OTHER: 2.1, k.TRAIN_LOSS: 0.5})
    info = ConfigRecord({k.CLIENT_NAME: "clinic-a", k.STATUS: status, k.UNRECORDED: json.dumps(late)})
    reply = Message(RecordDict({k.METRICS: metrics, k.CLIENT_INFO: info}),
                    reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


LATE = {"round": 1, "status": k.STATUS_TRAINED, "num_examples": 64, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
        "sample_rate": 0.25, "steps": 4, "delta": 1e-5, "epsilon": 1.2, "epsilon_prv": 1.3}


@pytest.mark.parametrize("bad", [{"steps": -50}, {"noise_multiplier": None}, {"sample_rate": 0.0},
                                 {"status": k.STATUS_DECLINED}, {"steps": 0}, {"epsilon": -1.0}])
def test_late_entries_that_do_not_hold_up_are_dropped_and_the_round_goes_on(bad):
    """A hostile client once crashed the server before its ledger save (σ missing) or lowered its
    own recomputed ε (negative steps)."""
    ledger = PrivacyLedger("rdp", True)
    record_privacy(ledger, 2, [_late_reply(5, [LATE, {**LATE, **bad}])], {})
    assert [(e.round, e.recorded_late) for e in ledger.entries("clinic-a")] == [(2, False)]
    assert [steps for _, _, steps in ledger.spent("clinic-a")] == [4]


def test_late_entries_count_also_when_the_update_itself_is_rejected():
    from fedtune.server.rounds import _refuse_malformed

    reply = _late_reply(5, [LATE])
    replies, refused = _refuse_malformed([reply], ArrayRecord(), [Message(RecordDict(), dst_node_id=5,
                                                                          message_type="train")], 2, Console(),
                                         max_update_norm=0.0)
    ledger = PrivacyLedger("rdp", True)
    record_privacy(ledger, 2, replies, {}, refused)
    assert [(e.round, e.status, e.recorded_late) for e in ledger.entries("clinic-a")] == [
        (1, k.STATUS_TRAINED, True), (2, k.STATUS_REJECTED, False)]


def test_a_refused_reply_stating_another_institutions_name_is_its_own_nodes_failure():
    """A review: node 11, known as clinic-a, sent a malformed update stating clinic-b with a late entry
    of 5000 steps; the ledger put both on clinic-b (who then refused to train as having lost its state)
    and renamed node 11 clinic-b."""
    from fedtune.server.rounds import _refuse_malformed

    reply = _late_reply(11, [LATE])  # states clinic-a
    names = {11: "clinic-b"}
    replies, refused = _refuse_malformed([reply], ArrayRecord(), [Message(RecordDict(), dst_node_id=11,
                                                                          message_type="train")], 2, Console(),
                                         max_update_norm=0.0, known=names)
    assert refused == {}
    ledger = PrivacyLedger("rdp", True)
    record_privacy(ledger, 2, replies, names, refused)
    assert [(e.status, e.steps) for e in ledger.entries("clinic-b")] == [(k.STATUS_FAILED, None)]
    assert "clinic-a" not in ledger.clients and names == {11: "clinic-b"}
    _, refused = _refuse_malformed([reply], ArrayRecord(), [Message(RecordDict(), dst_node_id=11,
                                                                    message_type="train")], 2, Console(),
                                   max_update_norm=0.0, known={11: "clinic-a"})
    assert set(refused) == {11}, "stating its own name, its spending is on record"


def test_figures_off_the_runs_schedule_are_not_recorded_from_a_refused_reply_or_a_late_entry():
    """A review: a refused reply's figures (and late entries) were never held to the schedule; 10^6 steps
    for n = 50 went into the ledger as they were."""
    from fedtune.server.rounds import _refuse_malformed
    from fedtune.server.validate import Schedule

    schedule = Schedule(batch_size=16, local_epochs=1)  # n = 64: 4 batches, q = 1/4, 4 steps: LATE's figures
    sent = [Message(RecordDict(), dst_node_id=5, message_type="train")]
    fine = _late_reply(5, [LATE])
    _, refused = _refuse_malformed([fine], ArrayRecord(), sent, 2, Console(), max_update_norm=0.0, schedule=schedule)
    assert len(refused[5][2]) == 1, "on the schedule: the late entry counts"
    inflated = _late_reply(5, [{**LATE, "steps": 10**6}])
    _, refused = _refuse_malformed([inflated], ArrayRecord(), sent, 2, Console(), max_update_norm=0.0,
                                   schedule=schedule)
    assert refused[5][2] == [], "the late list is dropped"
    ledger = PrivacyLedger("rdp", True)
    record_privacy(ledger, 2, [inflated], {}, schedule=schedule)
    assert [e.recorded_late for e in ledger.entries("clinic-a")] == [False]
    off = _late_reply(5, [])
    off.content[k.METRICS] = MetricRecord({**off.content[k.METRICS], k.STEPS: 10**6})
    replies, refused = _refuse_malformed([off], ArrayRecord(), sent, 2, Console(), max_update_norm=0.0,
                                         schedule=schedule)
    assert refused == {} and replies[0].has_error()


def test_a_late_entry_of_a_round_never_committed_survives_the_resume():
    written = PrivacyLedger("rdp", True)
    record_privacy(written, 4, [_late_reply(5, [LATE])], {})  # round 4 reports round 1's spending, then a crash
    resumed = PrivacyLedger("rdp", True)
    resumed.record_interrupted(written, committed_round=3)
    assert [(e.round, e.recorded_round, e.interrupted) for e in resumed.entries("clinic-a")] == [
        (1, 4, True), (4, None, True)]


def _answer(node: int, status: str, reason: str = "") -> Message:
    instruction = Message(RecordDict({k.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type="train")
    info = {k.CLIENT_NAME: f"clinic-{node}", k.STATUS: status, **({k.REASON: reason} if reason else {})}
    return Message(RecordDict({k.METRICS: MetricRecord(METRICS), k.CLIENT_INFO: ConfigRecord(info)}),
                   reply_to=instruction)


def test_a_round_every_answering_institution_refused_stops_the_run_with_their_reasons():
    """docs/privacy.md: "When every institution that answered a round refused, the run stops with
    their reasons." One that trained, or declined, keeps the run going."""
    from fedtune.errors import FedtuneError
    from fedtune.server.rounds import _stop_if_all_refused

    refused = [_answer(1, k.STATUS_REFUSED, "sigma 0.5 < min-noise-multiplier 1"),
               _answer(2, k.STATUS_REFUSED, "delta 1e-3 > max-delta 1e-05")]
    with pytest.raises(FedtuneError) as stopped:
        _stop_if_all_refused(4, refused)
    assert "Round 4" in str(stopped.value) and "clinic-1: sigma 0.5 < min-noise-multiplier 1" in str(stopped.value)
    assert "clinic-2: delta 1e-3 > max-delta 1e-05" in str(stopped.value)
    for other in (k.STATUS_TRAINED, k.STATUS_DECLINED):
        _stop_if_all_refused(4, [*refused, _answer(3, other)])
    _stop_if_all_refused(4, [])  # no answers: the quorum check's business, not a refusal
