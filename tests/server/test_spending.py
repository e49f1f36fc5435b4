"""The ledger's side of "ε never resets silently" (server/spending.py)."""

from __future__ import annotations

import dataclasses
import json
import math
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


def test_a_history_too_long_for_prv_is_recomputed_with_rdp_not_a_failed_round():
    """A review: 10^6 full-batch steps ask PRV for TiB; the MemoryError failed every round before the
    ledger was saved (and `privacy-report` with a traceback). RDP bounds the same mechanism from above."""
    history = [(1.0, 1.0, 10**6)]
    assert epsilon("prv", history, DELTA) == epsilon("rdp", history, DELTA) > 1e5
    ledger = PrivacyLedger("prv", True, {"a": [dataclasses.replace(entry(1, [(1.0, 0.25, 4)]), sample_rate=1.0,
                                                                    steps=10**6)]})
    assert flag_lost_state(ledger, 1, DELTA) == ["a"] and ledger.epsilon_max() > 1e5


def test_a_history_no_accountant_can_evaluate_fails_closed_at_infinity(tmp_path, monkeypatch):
    import fedtune.server.spending as spending

    def fails(*args):
        raise ValueError("no accountant can evaluate this")

    monkeypatch.setattr(spending, "epsilon", fails)
    ledger = PrivacyLedger("prv", True, {"a": [entry(1, [(1.0, 0.25, 4)])]})
    assert flag_lost_state(ledger, 1, DELTA) == ["a"]
    assert ledger.epsilon_max() == math.inf
    ledger.save(tmp_path)
    assert PrivacyLedger.load(tmp_path).epsilon_max() == math.inf, "∞ is written as null and read back as ∞"


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


# After the last round: spending in a round whose reply never came is asked for and recorded.

def _institutions(tmp_path, trained: bool = True) -> SimpleNamespace:
    """A client that trained round 1 (its reply lost on the way), or did not; `answer` delivers a message
    to the real ClientApp of node 7 (partition 0), which states its name, client-0000, and `send` a list."""
    from flwr.app import Context

    from fedtune.client import app as client_app
    from tests.client.test_privacy_gate import _cfg, _message

    cfg = _cfg()
    node = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    lost = client_app.train(_message(cfg, str(tmp_path)), context) if trained else None
    asked = []

    def answer(message: Message) -> Message:
        asked.append(message.metadata.dst_node_id)
        handle = client_app.identify if message.metadata.message_type == k.IDENTIFY else client_app.report_unrecorded
        reply = handle(message, context)
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return reply

    return SimpleNamespace(cfg=cfg, spent=lost and lost.content[k.METRICS], answer=answer, asked=asked,
                           send=lambda messages, label: [answer(m) for m in messages],
                           config={**cfg.to_flat(), k.CLIENT_STATE_DIR: str(tmp_path)})


def test_spending_of_a_last_reply_that_never_came_is_asked_for_once_and_recorded_late(tmp_path):
    from fedtune.server.rounds import NO_REPLY
    from fedtune.server.spending import ask_unrecorded, awaiting_report

    one = _institutions(tmp_path)
    spent, send, config, asked = one.spent, one.send, one.config, one.asked
    ledger = PrivacyLedger("prv", True)
    ledger.record_failure("client-0000", 1, NO_REPLY)  # the server's view: nothing came
    assert awaiting_report(ledger) == ["client-0000"] and ledger.epsilon_of("client-0000") == 0.0

    assert ask_unrecorded(ledger, {7: "client-0000"}, [7], config, 1, send).recorded == ["client-0000"]
    entries = ledger.entries("client-0000")
    assert [(e.round, e.status, e.recorded_late, e.recorded_round) for e in entries] == [
        (1, "failed", False, None), (1, "trained", True, 1)]
    assert ledger.spent("client-0000") == [(spent[k.NOISE_MULTIPLIER], spent[k.SAMPLE_RATE], spent[k.STEPS])]
    assert ledger.epsilon_of("client-0000") == pytest.approx(spent[k.EPSILON])

    assert awaiting_report(ledger) == []
    assert ask_unrecorded(ledger, {7: "client-0000"}, [7], config, 1, send).recorded == []
    assert asked == [7], "once recorded, the client is not asked again"


def test_spending_reported_after_the_last_round_is_held_to_the_runs_schedule(tmp_path):
    """A review: late entries asked for after the last round skipped the schedule check that a round's
    replies now pass through (10^6 steps for n = 50 went into the ledger)."""
    from fedtune.server.rounds import NO_REPLY
    from fedtune.server.spending import ask_unrecorded
    from fedtune.server.validate import Schedule

    one = _institutions(tmp_path)
    off = Schedule(batch_size=1, local_epochs=1)  # another schedule than the one the client trained on
    ledger = PrivacyLedger("prv", True)
    ledger.record_failure("client-0000", 1, NO_REPLY)
    assert ask_unrecorded(ledger, {7: "client-0000"}, [7], one.config, 1, one.send, schedule=off).recorded == []
    assert ledger.spent("client-0000") == []
    on = Schedule.of(one.cfg, one.cfg.train.learning_rate, 0.0)
    assert ask_unrecorded(ledger, {7: "client-0000"}, [7], one.config, 1, one.send,
                          schedule=on).recorded == ["client-0000"]


def test_nothing_is_recorded_from_a_node_that_is_gone_or_states_another_name(tmp_path):
    from fedtune.server.spending import ask_unrecorded

    one = _institutions(tmp_path)
    send, config, asked = one.send, one.config, one.asked
    for names, connected in (({7: "client-0000"}, []), ({7: "clinic-b"}, [7])):
        name = names[7]
        ledger = PrivacyLedger("prv", True)
        ledger.record_failure(name, 1, "no reply")
        assert ask_unrecorded(ledger, names, connected, config, 1, send).recorded == []
        assert [e.status for e in ledger.entries(name)] == ["failed"] and not ledger.spent(name)
    assert asked == [7], "the node that is gone is not asked; the one asked answers as client-0000"


def test_a_client_that_did_not_train_reports_nothing(tmp_path):
    from fedtune.server.spending import ask_unrecorded

    one = _institutions(tmp_path, trained=False)  # the message never reached it
    send, config, asked = one.send, one.config, one.asked
    ledger = PrivacyLedger("prv", True)
    ledger.record_failure("client-0000", 1, "no reply")
    assert ask_unrecorded(ledger, {7: "client-0000"}, [7], config, 1, send).recorded == [] and asked == [7]
    assert [e.status for e in ledger.entries("client-0000")] == ["failed"]


def test_a_node_the_server_cannot_name_is_asked_who_it_is_first(tmp_path):
    """A resumed simulation's nodes have new ids; a node whose only reply never came is on record as
    `node-7`. Either way the connected node says its name, then is asked for its spending."""
    from fedtune.server.spending import ask_unrecorded

    for placeholder, names in (("client-0000", {99: "client-0000"}), ("node-7", {})):
        one = _institutions(tmp_path / placeholder)
        ledger = PrivacyLedger("prv", True)
        ledger.record_failure(placeholder, 1, "no reply")
        assert ask_unrecorded(ledger, names, [7], one.config, 1, one.send).recorded == ["client-0000"]
        assert names[7] == "client-0000" and list(ledger.clients) == ["client-0000"]
        assert [(e.status, e.recorded_late) for e in ledger.entries("client-0000")] == [("failed", False),
                                                                                        ("trained", True)]
        assert one.asked == [7, 7], "identify, then the spending"


def test_a_resumed_run_asks_every_client_also_those_without_any_entry(tmp_path):
    """A crash or Ctrl-C while client-0000 trained: no entry of that round reached the ledger, not even
    a failure, and if it is not sampled again nothing reports its spending (a review found this).
    Asking only the clients awaiting a report finds nothing; a resumed run asks everyone."""
    from fedtune.server.spending import ask_unrecorded, awaiting_report

    one = _institutions(tmp_path)
    ledger = PrivacyLedger("prv", True)  # the crash left no entry for it
    assert awaiting_report(ledger) == [] and ask_unrecorded(ledger, {}, [7], one.config, 3, one.send).recorded == []
    assert one.asked == []
    assert ask_unrecorded(ledger, {}, [7], one.config, 3, one.send, everyone=True).recorded == ["client-0000"]
    assert one.asked == [7, 7], "identify (a resumed simulation's node is new), then the spending"
    assert ledger.spent("client-0000") == [(one.spent[k.NOISE_MULTIPLIER], one.spent[k.SAMPLE_RATE],
                                            one.spent[k.STEPS])]
    assert ask_unrecorded(ledger, {7: "client-0000"}, [7], one.config, 3, one.send, everyone=True).recorded == []
    assert ledger.epsilon_of("client-0000") == pytest.approx(one.spent[k.EPSILON]), "recorded once"


class _OneNodeGrid:
    """Node 7 only, answered by `answer` as soon as a message is pushed (a grid's push and pull);
    `registered`: the names it is registered under (deployment), none in simulation."""

    def __init__(self, answer, registered: tuple[tuple[int, str, bytes], ...] = ()):
        self.answer, self.replies = answer, {}
        self.registered = [SimpleNamespace(node_id=node, name=name, public_key=key) for node, name, key in registered]

    def get_node_ids(self):
        return [7]

    def get_nodes(self):
        return self.registered

    def push_messages(self, messages):
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what Flower's grids do
            self.replies[message.metadata.message_id] = self.answer(message)
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in list(message_ids) if message_id in self.replies]


def _finished_run(tmp_path, registered=()) -> SimpleNamespace:
    """A run directory whose last round, 1, is committed with client-0000's reply on record as never
    come, and what _record_unreported needs to finish it."""

    import torch
    from rich.console import Console
    from rich.progress import Progress

    from fedtune.server.rounds import NO_REPLY, RoundInputs, Transport
    from fedtune.server.run_dir import Checkpoint, RunDirectory

    one = _institutions(tmp_path / "client")
    run = RunDirectory.create(tmp_path / "run", one.cfg)
    ledger = PrivacyLedger(one.cfg.dp.accountant, True)
    ledger.record_failure("client-0000", 1, NO_REPLY)
    ledger.save(run.path)
    rows = [{"round": r, "eval_accuracy": 0.5, "epsilon_max": 0.0} for r in (0, 1)]
    last = Checkpoint(1, {"w": torch.zeros(2)}, rows, ledger.to_dict(), {7: "client-0000"})
    run.commit(last)
    console = Console(record=True, width=200)
    inputs = RoundInputs(one.cfg, run, evaluate=None, console=console)
    transport = Transport(_OneNodeGrid(one.answer, registered), Progress(disable=True), None, inputs.stop, False, None)
    spent = [(one.spent[k.NOISE_MULTIPLIER], one.spent[k.SAMPLE_RATE], one.spent[k.STEPS])]
    return SimpleNamespace(one=one, run=run, ledger=ledger, last=last, inputs=inputs, transport=transport,
                           console=console, spent=spent)


def test_a_finished_run_keeps_the_late_spending_in_its_ledger_file_and_last_checkpoint(tmp_path):
    """The round loop's last step (server/rounds.py::_record_unreported): a resume, which starts from the
    checkpoint's ledger, must not drop what was recorded after the last round was committed."""
    from fedtune.server.rounds import _record_unreported

    f = _finished_run(tmp_path)
    final = _record_unreported(f.transport, f.inputs, f.last, f.ledger)
    assert f.run.read_ledger().spent("client-0000") == f.spent, "privacy_ledger.json has it"
    latest = f.run.latest_checkpoint()
    assert PrivacyLedger.from_dict(latest.ledger).spent("client-0000") == f.spent
    assert f.run.ledger_to_resume(latest).spent("client-0000") == f.spent, "once, after a resume"
    assert latest.metrics[-1]["epsilon_max"] == pytest.approx(f.one.spent[k.EPSILON]), "the last row's ε too"
    assert final.round == 1 and "client-0000" in f.console.export_text() and f.one.asked == [7]


def test_a_crash_before_the_checkpoint_is_written_again_keeps_the_late_spending(tmp_path, monkeypatch):
    from fedtune.server.rounds import _record_unreported

    f = _finished_run(tmp_path)
    monkeypatch.setattr(type(f.run), "commit", lambda self, checkpoint: None)  # dies right after the ledger save
    _record_unreported(f.transport, f.inputs, f.last, f.ledger)
    resumed = f.run.ledger_to_resume(f.run.latest_checkpoint())
    assert resumed.spent("client-0000") == f.spent, "kept from the file, once"
    assert [(e.status, e.recorded_late) for e in resumed.entries("client-0000")] == [("failed", False),
                                                                                      ("trained", True)]


def test_ctrl_c_while_asking_stops_the_run_before_its_summary_so_a_resume_asks_again(tmp_path):
    from fedtune.server.rounds import RunStopped, _record_unreported

    f = _finished_run(tmp_path)
    f.inputs.stop.set()
    with pytest.raises(RunStopped, match="after round 1"):
        _record_unreported(f.transport, f.inputs, f.last, f.ledger)
    assert f.one.asked == [], "nothing was sent once the stop was set"
    assert f.run.read_ledger().entries("client-0000")[-1].status == "failed", "still awaiting its report"


def test_only_a_resumed_run_asks_clients_that_await_no_report_after_its_last_round(tmp_path):
    from fedtune.server.rounds import _record_unreported

    f = _finished_run(tmp_path)
    empty = PrivacyLedger(f.one.cfg.dp.accountant, True)  # client-0000's round 1 left no entry (a crash)
    empty.save(f.run.path)
    _record_unreported(f.transport, f.inputs, f.last, empty)
    assert f.one.asked == [] and not f.run.read_ledger().spent("client-0000")
    f.inputs.resumed = True
    _record_unreported(f.transport, f.inputs, f.last, empty)
    assert f.one.asked == [7] and f.run.read_ledger().spent("client-0000") == f.spent


def test_nodes_whose_registered_identity_is_in_doubt_are_not_asked(tmp_path):
    from fedtune.server.rounds import _record_unreported

    f = _finished_run(tmp_path, registered=((7, "client-0000", b"key"), (8, "client-0000", b"other key")))
    _record_unreported(f.transport, f.inputs, f.last, f.ledger)
    assert f.one.asked == [] and not f.run.read_ledger().spent("client-0000")


@pytest.mark.parametrize(("round_timeout", "waits"), [(None, 120.0), (30.0, 30.0), (600.0, 120.0)])
def test_a_finished_run_waits_two_minutes_and_a_second_a_client_for_unrecorded_spending(tmp_path, monkeypatch,
                                                                                       round_timeout, waits):
    """UNRECORDED_TIMEOUT_S caps the wait after the last round, a shorter round timeout shortens it, and each
    client asked adds UNRECORDED_PER_CLIENT_S: a resumed simulation of thousands asks every one of them."""
    import dataclasses

    from fedtune.server import rounds
    from fedtune.server.spending import Asked

    f = _finished_run(tmp_path)
    used = []
    monkeypatch.setattr(rounds, "ask_unrecorded",
                        lambda *args, **_: used.append(args[-1].__self__.timeout_s) or Asked([], []))
    rounds._record_unreported(dataclasses.replace(f.transport, timeout_s=round_timeout), f.inputs, f.last, f.ledger)
    clients = len(f.transport.grid.get_node_ids())
    assert used == [waits + clients * rounds.UNRECORDED_PER_CLIENT_S] and rounds.UNRECORDED_TIMEOUT_S == 120.0


def test_clients_that_do_not_answer_after_the_last_round_are_named(tmp_path, monkeypatch):
    """A review's case: in a resumed run of thousands of clients, the ones that did not answer within the
    wait were dropped without a word, and the finished ledger understated their spending."""
    from fedtune.server import rounds
    from fedtune.server.spending import Asked, ask_unrecorded

    f = _finished_run(tmp_path)
    asked = ask_unrecorded(f.ledger, {7: "client-0000"}, [7], f.one.config, 1, lambda messages, what: [],
                           everyone=True)
    assert asked == Asked([], ["client-0000"]), "no reply: silent"
    monkeypatch.setattr(rounds, "ask_unrecorded", lambda *args, **_: Asked([], ["client-0000", "client-0001"]))
    rounds._record_unreported(f.transport, f.inputs, f.last, f.ledger)
    text = f.console.export_text()
    assert "client-0000, client-0001 did not answer" in text and "not in the ledger" in text


def test_a_noise_multiplier_the_accountant_divides_by_fails_closed_not_the_round():
    """A hostile node's review: σ = 1e-300 (q and steps on schedule) made the accountant raise
    ZeroDivisionError, which failed the round for everyone before the ledger was saved, on every resume."""
    ledger = PrivacyLedger("prv", True, {"a": [dataclasses.replace(entry(1, [(1.0, 0.25, 4)]),
                                                                    noise_multiplier=1e-300)]})
    assert flag_lost_state(ledger, 1, DELTA) == ["a"] and ledger.epsilon_max() == math.inf


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  json.dumps([{**entry(1, [(1.0, 0.25, 4)]).to_dict(), "nested": {"a": {"b": 1}}}]),
                                  json.dumps([entry(1, [(1.0, 0.25, 4)]).to_dict()] * 2000)])
def test_unrecorded_spending_that_no_client_writes_is_dropped_not_a_crash(text):
    """The same review: JSON nested past Python's recursion limit raised RecursionError through the round; a
    key fedtune does not write was kept (`extra`) and saved as sent, so a deeply nested one broke every later
    save; and the number of entries had no bound."""
    from fedtune.server.spending import unrecorded_entries

    assert unrecorded_entries(ConfigRecord({k.UNRECORDED: text})) == []
