"""A client's privacy state: survives a restart, and one training at a time per institution."""

import threading
import time

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


def test_state_lock_serializes_trainings_of_one_institution(tmp_path):
    order = []

    def hold(tag: str, delay: float) -> None:
        time.sleep(delay)
        with state_lock(str(tmp_path), "clinic-a"):
            order.append(f"{tag} start")
            time.sleep(0.3)
            order.append(f"{tag} end")

    threads = [threading.Thread(target=hold, args=("first", 0.0)), threading.Thread(target=hold, args=("second", 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first start", "first end", "second start", "second end"]
