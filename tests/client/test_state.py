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
