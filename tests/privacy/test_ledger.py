"""The privacy ledger (privacy/ledger.py): typed entries, named records, one load/save pair."""

import json
import math

import pytest

from fedtune import constants as k
from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.ledger import LEDGER, LedgerEntry, PrivacyLedger, client_notes, read_ledger


def metrics(eps: float, steps: int = 4) -> dict:
    """A client's reply metrics (client/app.py's _report)."""
    return {k.NUM_EXAMPLES: 64, k.NOISE_MULTIPLIER: 1.0, k.MAX_GRAD_NORM: 1.0, k.SAMPLE_RATE: 0.25, k.STEPS: steps,
            k.DELTA: 1e-5, k.EPSILON: eps, k.EPSILON_OTHER: eps * 1.1}


def a_ledger() -> PrivacyLedger:
    """One of each kind of entry the server records."""
    ledger = PrivacyLedger("prv", True)
    ledger.record_round("a", 1, k.STATUS_TRAINED, metrics(1.0), **client_notes({k.POLICY: "node config"}))
    ledger.record_round("a", 2, k.STATUS_REJECTED, metrics(1.5), reason="update rejected: w has NaN")
    ledger.record_round("b", 1, k.STATUS_REFUSED, metrics(0.0, steps=0), reason="σ below this node's minimum")
    ledger.record_round("b", 2, k.STATUS_TRAINED, metrics(math.inf))  # a round without noise
    ledger.record_failure("c", 1, "no reply before timeout (round_timeout_s)")
    ledger.record_exclusion("d", 2, "its registered key changed")
    ledger.mark_state_lost("a", 2, 2.5)
    ledger.record_client_level({"mode": "fixed", "rounds": 2, "epsilon": 3.0})
    return ledger


def test_a_failure_entry_carries_its_reason_and_no_figures():
    ledger = PrivacyLedger("prv", True)
    ledger.record_failure("c", 3, "worker died")
    (entry,) = ledger.entries("c")
    assert (entry.round, entry.status, entry.reason, entry.reported, entry.steps) == (3, k.STATUS_FAILED,
                                                                                     "worker died", False, None)
    assert entry.to_dict() == {"round": 3, "status": "failed", "reason": "worker died"}  # as written before
    assert ledger.spent("c") == [] and ledger.epsilon_max() == 0.0


def test_a_saved_ledger_loads_equal(tmp_path):
    ledger = a_ledger()
    ledger.save(tmp_path)
    again = PrivacyLedger.load(tmp_path)
    assert again == ledger and again.to_dict() == ledger.to_dict()
    assert again.entries("b")[1].epsilon == math.inf
    assert json.loads((tmp_path / LEDGER).read_text())["clients"]["b"][1]["epsilon"] is None, "∞ is null on disk"
    lost = again.entries("a")[1]
    assert lost.state_lost and lost.epsilon_recomputed == 2.5 and lost.reason.startswith("update rejected")
    assert PrivacyLedger.load(tmp_path / "elsewhere") is None, "no ledger yet"


def test_readers_get_copies():
    ledger = a_ledger()
    ledger.clients.pop("a")
    level = ledger.client_level
    level["rounds"] = 99
    assert "a" in ledger.clients and ledger.client_level["rounds"] == 2


def test_entries_recorded_under_a_node_join_the_client_in_round_order():
    ledger = PrivacyLedger("prv", True)
    ledger.record_failure("node-7", 1, "no reply")
    ledger.record_round("clinic-7", 2, k.STATUS_TRAINED, metrics(1.0))
    ledger.record_failure("node-7", 3, "no reply")
    ledger.attribute("node-7", "clinic-7")
    assert "node-7" not in ledger.clients
    assert [(e.round, e.status) for e in ledger.entries("clinic-7")] == [(1, "failed"), (2, "trained"), (3, "failed")]


def test_a_resume_keeps_the_spending_of_a_round_never_committed():
    committed = PrivacyLedger("prv", True)
    committed.record_round("a", 1, k.STATUS_TRAINED, metrics(1.0))
    written = PrivacyLedger.from_dict(committed.to_dict())
    written.record_round("a", 2, k.STATUS_TRAINED, metrics(1.4))
    written.record_client_level({"rounds": 2, "epsilon": 2.0})
    committed.record_interrupted(written, committed_round=1)
    assert [(e.round, e.interrupted) for e in committed.entries("a")] == [(1, False), (2, True)]
    assert committed.spent("a") == [(1.0, 0.25, 4), (1.0, 0.25, 4)] and committed.client_level["rounds"] == 2


TRAINED = ('{"accountant": "prv", "dp_enabled": true, "clients": {"a": [{"round": 1, "status": "trained", '
           '"num_examples": 64, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.25, "steps": 4, '
           '"delta": 1e-05, "epsilon": 2.0}]}}')


def test_the_well_formed_trained_entry_the_damaged_ones_are_made_from_loads(tmp_path):
    (tmp_path / LEDGER).write_text(TRAINED)
    assert PrivacyLedger.load(tmp_path).spent("a") == [(1.0, 0.25, 4)]


@pytest.mark.parametrize("text", [
    '{"clients": {', "{}", "[]", '{"accountant": "prv", "dp_enabled": true, "clients": 3}',
    '{"accountant": "prv", "dp_enabled": true, "clients": {"a": [{"round": "one", "status": "trained"}]}}',
    '{"accountant": "prv", "dp_enabled": true, "clients": {"a": [{"status": "trained"}]}}',
    '{"accountant": "prv", "dp_enabled": true, "clients": {"a": [{"round": 1, "status": "trained", "epsilon": "x"}]}}',
    '{"unit": "patient", "accountant": "prv", "dp_enabled": true, "clients": {}}',
    # figures no accountant takes (a review: privacy-verify and privacy-report crashed on each, exit 1)
    *(TRAINED.replace(before, after) for before, after in (
        ('"sample_rate": 0.25', '"sample_rate": 2'), ('"delta": 1e-05', '"delta": 0'), ('"steps": 4', '"steps": -1'),
        ('"noise_multiplier": 1.0', '"noise_multiplier": -1'), ('"delta": 1e-05', '"delta": 1.5'))),
])
def test_a_damaged_ledger_raises_and_is_left_untouched(tmp_path, text):
    (tmp_path / LEDGER).write_text(text)
    with pytest.raises(ConfigError, match="damaged.*Restore it from a backup; nothing was changed"):
        PrivacyLedger.load(tmp_path)
    with pytest.raises(ConfigError, match="damaged"):
        read_ledger(tmp_path)  # the report's, the verifier's and the audit's way in
    assert (tmp_path / LEDGER).read_text() == text


def test_a_missing_ledger_is_named_for_readers_that_need_one(tmp_path):
    with pytest.raises(FedtuneError, match="does not exist"):
        read_ledger(tmp_path)
    with pytest.raises(FedtuneError, match="nope does not exist. Pass the run directory"):
        read_ledger(tmp_path / "nope")
    (tmp_path / "ledger.csv").write_text("a,b\n")
    with pytest.raises(FedtuneError, match="ledger.csv is a file, not a run directory"):
        read_ledger(tmp_path / "ledger.csv")


def test_ledgers_written_by_earlier_versions_load_and_keep_every_key(tmp_path):
    """Before client-level DP (no client_level), before n was reported (no num_examples), without the
    unit line; a client-kept adopted_ledger_spending of 1; a key this version does not know."""
    old = {"accountant": "rdp", "dp_enabled": True, "clients": {"a": [
        {"round": 1, "status": "trained", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.25,
         "steps": 4, "delta": 1e-5, "epsilon": 1.2, "epsilon_prv": 1.1, "adopted_ledger_spending": 1},
        {"round": 2, "status": "trained", "epsilon": None, "note_from_the_future": [1, 2]},
        {"round": 3, "status": "failed", "reason": "worker died"}]}}
    (tmp_path / LEDGER).write_text(json.dumps(old))
    ledger = PrivacyLedger.load(tmp_path)
    first, second, third = ledger.entries("a")
    assert (first.accountant, first.epsilon_other, first.num_examples, first.adopted_ledger_spending) == \
        ("rdp", 1.1, None, True)
    assert second.epsilon == math.inf and second.extra == {"note_from_the_future": [1, 2]}
    assert third.reason == "worker died" and not third.reported
    assert ledger.client_level is None and ledger.spent("a") == [(1.0, 0.25, 4)] and ledger.unit == "record"
    worded = {**old, "unit": "one record of one institution (sample-level DP; add/remove-one neighbouring datasets)"}
    assert PrivacyLedger.from_dict(worded).unit == "record"  # how the unit was written before dp.unit
    assert PrivacyLedger.from_dict({**old, "unit": "user"}).unit == "user"
    ledger.save(tmp_path)  # a resume rewrites it: nothing on record is dropped
    again = json.loads((tmp_path / LEDGER).read_text())
    assert again["clients"]["a"][1] == old["clients"]["a"][1]
    assert {**again["clients"]["a"][0], "adopted_ledger_spending": 1} == old["clients"]["a"][0]


def test_an_entry_round_trips_on_its_own():
    entry = LedgerEntry.from_report(4, k.STATUS_DECLINED, metrics(2.0, steps=0), "prv", reason="over budget")
    assert LedgerEntry.from_dict(entry.to_dict()) == entry, "the client's own ledger names no accountant"
    assert set(entry.to_dict()) == {"round", "status", "num_examples", "noise_multiplier", "max_grad_norm",
                                    "sample_rate", "steps", "delta", "epsilon", "epsilon_rdp", "reason"}


def test_a_failure_keeps_one_line_of_a_coloured_traceback():
    from fedtune.privacy.ledger import one_line

    traceback = ("\x1b[31mTraceback (most recent call last):\x1b[0m\n  File \"worker.py\", line 3, in run\n"
                 "    train()\n\x1b[1mRuntimeError: CUDA out of memory\x1b[0m\n\n")
    ledger = PrivacyLedger("rdp", True)
    ledger.record_failure("clinic-a", 2, traceback)
    assert ledger.entries("clinic-a")[0].reason == "RuntimeError: CUDA out of memory"
    assert one_line("no reply before timeout") == "no reply before timeout"


def test_the_largest_epsilon_is_unbounded_once_anyone_trained_without_noise():
    """metrics.jsonl and summary.json once showed a finite ε_max while a client's ε was ∞."""
    assert a_ledger().epsilon_max() == math.inf  # b trained without noise in round 2
    bounded = PrivacyLedger("prv", True)
    bounded.record_round("a", 1, k.STATUS_TRAINED, metrics(1.0))
    bounded.record_round("b", 1, k.STATUS_TRAINED, metrics(2.0))
    assert bounded.epsilon_max() == 2.0 and PrivacyLedger("prv", False).epsilon_max() is None


def test_a_late_entry_keeps_none_of_the_marks_only_the_server_sets():
    """A hostile node's review: late entries were kept as sent, so a client could mark its own spending
    state_lost or interrupted (which change how the report and privacy-verify count it), name a policy
    fedtune never writes (the report words "against whom" from it), or add keys of its own."""
    import dataclasses

    from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger

    sent = LedgerEntry(2, "trained", "prv", num_examples=50, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0,
                       steps=1, delta=1e-5, epsilon=1.0)
    sent = dataclasses.replace(sent, state_lost=True, epsilon_recomputed=0.1, interrupted=True,
                               policy="the coordinator's promise", extra={"note": "x" * 10})
    ledger = PrivacyLedger("prv", True)
    ledger.record_late("a", 3, [sent])
    kept = ledger.clients["a"][-1]
    assert (kept.recorded_late, kept.recorded_round, kept.state_lost, kept.epsilon_recomputed, kept.interrupted,
            kept.policy, dict(kept.extra)) == (True, 3, False, None, False, None, {})
