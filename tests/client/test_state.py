"""A client's privacy state: survives a restart, and one training at a time per institution."""

import fcntl
import threading

import pytest
from flwr.app import Context, RecordDict

from fedtune.client.state import ClientState, load_state, save_state, state_lock
from fedtune.privacy.ledger import LedgerEntry


def _context(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={})


def test_the_file_outlives_the_process_and_wins_over_context_state(tmp_path):
    entry = LedgerEntry(1, "trained", "prv", steps=10, epsilon=0.5, epsilon_other=0.6, adopted_ledger_spending=True)
    saved = ClientState([(1.0, 0.1, 10)], noise_multiplier=1.3, ledger=[entry])
    save_state(_context(), "clinic-a", str(tmp_path), saved)
    fresh = _context()  # a restarted SuperNode: empty Context state
    assert load_state(fresh, "clinic-a", str(tmp_path)) == saved
    assert load_state(fresh, "clinic-b", str(tmp_path)) == ClientState()


def test_state_lock_serializes_trainings_of_one_institution(tmp_path, monkeypatch):
    """While one training holds the lock, a second waits inside flock and starts only after the first
    ends; ordered by events, not sleeps (state.py's flock call signals when the second one asks)."""
    real_flock = fcntl.flock
    first_holds, second_asks = threading.Event(), threading.Event()

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX and threading.current_thread().name == "second":
            second_asks.set()  # about to block: the first still holds the lock
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    order = []

    def first() -> None:
        with state_lock(str(tmp_path), "clinic-a"):
            order.append("first start")
            first_holds.set()
            assert second_asks.wait(timeout=30), "the second training never asked for the lock"
            # No one else can take it meanwhile (another process or thread opens the file anew).
            with open(tmp_path / "clinic-a.lock") as probe, pytest.raises(BlockingIOError):
                real_flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            order.append("first end")

    def second() -> None:
        assert first_holds.wait(timeout=30)
        with state_lock(str(tmp_path), "clinic-a"):
            order.append("second start")
            order.append("second end")

    errors = []

    def run(target):
        try:
            target()
        except BaseException as err:  # surfaced below: a thread's failure does not fail the test by itself
            errors.append(err)

    threads = [threading.Thread(target=run, args=(f,), name=f.__name__) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert order == ["first start", "first end", "second start", "second end"]


def _own(round_: int, run: str = "b", steps: int = 4):
    from fedtune.privacy.ledger import LedgerEntry

    return LedgerEntry(round_, "trained", "prv", num_examples=64, noise_multiplier=1.0, max_grad_norm=1.0,
                       sample_rate=0.25, steps=steps, delta=1e-5, epsilon=1.0, run=run)


def test_an_unrecorded_entry_does_not_stand_in_for_one_the_state_lost():
    """A review's case: a copy restored from a backup holds rounds 1 and 2 of run b; round 2's reply never
    reached the server, whose ledger holds rounds 1 and 3. By (σ, q) totals the two records are equal; by
    the rounds the ledger holds, round 3 is missing from the state: refused, and adopting adds it, while
    round 2 is reported late."""
    from fedtune.client.state import ClientState, adopt_ledger_spending, lost_spending, unrecorded

    state = ClientState(history=[(1.0, 0.25, 8)], ledger=[_own(1), _own(2)])
    ledger, held = [(1.0, 0.25, 8)], [(1, 4), (3, 4)]
    assert lost_spending(state, ledger, "b", held) is not None
    adopt_ledger_spending(state, ledger, "b", held)
    assert state.history == [(1.0, 0.25, 8), (1.0, 0.25, 4)], "rounds 1, 2 and 3: nothing lost, nothing twice"
    assert lost_spending(state, ledger, "b", held) is None
    assert [e.round for e in unrecorded(state, ledger, held, "b")] == [2]


def test_the_adopted_spending_survives_the_state_file():
    from fedtune.client.state import ClientState

    state = ClientState(history=[(1.0, 0.25, 4)], ledger=[_own(1)], adopted={"b": [(1.0, 0.25, 4)]})
    assert ClientState.from_dict(state.to_dict()).to_dict() == state.to_dict()
    assert ClientState.from_dict(state.to_dict()).adopted == {"b": [(1.0, 0.25, 4)]}
    assert "adopted" not in ClientState(history=[(1.0, 0.25, 4)]).to_dict(), "older readers see the same file"


def test_a_state_an_earlier_fedtune_wrote_counts_steps_beyond_this_runs_entries_as_record_level():
    """A state file without `record_level` (an earlier fedtune) resumed in a user-level run: its steps are this
    run's own (its entries say so), so nothing conflicts; steps beyond them came from other runs, of a unit it
    never recorded, and a per-person ε cannot count them."""
    from fedtune.client.state import settle_unit, spent, unit_conflict

    own = LedgerEntry(1, "trained", "prv", 64, 1.0, steps=4, sample_rate=0.25, run="b")
    resumed = ClientState.from_dict({"history": [[1.0, 0.25, 4]], "ledger": [own.to_dict()]})
    assert resumed.record_level is None
    settle_unit(resumed, "b")
    assert resumed.record_level is False and unit_conflict(resumed, "user") is None
    shared = ClientState.from_dict({"history": [[1.0, 0.25, 12]], "ledger": [own.to_dict()]})
    settle_unit(shared, "b")
    assert shared.record_level and "group privacy" in unit_conflict(shared, "user")
    plain = ClientState()
    spent(plain, [(0.0, 1.0, 3)], None)  # a round without noise: ε = ∞, but no record-level DP step
    assert not plain.record_level and unit_conflict(plain, "user") is None
    spent(plain, [(0.0, 1.0, 3), (1.0, 0.25, 4)], "record")
    assert plain.record_level and unit_conflict(plain, "record") is None


def test_a_state_written_before_user_level_steps_were_recorded_is_read_fail_closed():
    """A review: a state from before `user_level` was kept, holding user-level steps (noised steps, no
    record-level ones), read as holding none, so a record-level run counted them at sensitivity C."""
    from fedtune.client.state import ClientState, unit_conflict

    user = ClientState.from_dict({"history": [[1.0, 0.25, 4]], "record_level": False})
    assert user.user_level and unit_conflict(user, "record")
    record = ClientState.from_dict({"history": [[1.0, 0.25, 4]], "record_level": True})
    assert not record.user_level and unit_conflict(record, "record") is None
    without_noise = ClientState.from_dict({"history": [[0.0, 1.0, 4]], "record_level": False})
    assert not without_noise.user_level
