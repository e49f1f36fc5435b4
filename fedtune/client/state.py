"""What a client remembers between rounds: its privacy history, the noise multiplier it solved
for (with --target-epsilon), and its own copy of its ledger entries.

It lives in Flower's Context state (kept by the SuperNode / the Simulation Engine between
rounds) and, when a state directory is known, in a file written atomically, so that it
survives a restart of the whole run or of the institution's SuperNode. The file wins if both
exist. The directory is the node config's `state-dir` (set by each institution in deployment),
else the one the server names (simulation: inside the run directory).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedtune.constants import CLIENT_STATE, NODE_STATE_DIR
from fedtune.durable import write_json_atomic
from fedtune.privacy.accountant import History, normalize


@dataclass
class ClientState:
    history: History = field(default_factory=list)  # Opacus accountant history: (sigma, q, steps) runs
    noise_multiplier: float | None = None  # solved once from dp.target_epsilon, then kept
    ledger: list[dict[str, Any]] = field(default_factory=list)  # this client's own round entries

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientState:
        return cls(normalize(data.get("history", [])), data.get("noise_multiplier"), list(data.get("ledger", [])))


def state_dir(context: Context, server_dir: str) -> str:
    return str(context.node_config.get(NODE_STATE_DIR, server_dir))


def _state_file(directory: str, client: str) -> Path | None:
    return Path(directory) / f"{client}.json" if directory else None


@contextmanager
def state_lock(directory: str, client: str) -> Iterator[None]:
    """Hold an exclusive lock from loading the state to saving it. Two processes training for the
    same institution (say a crashed server's leftover message and the resumed run's) would
    otherwise both start from the same history, and the later save would erase the other's spending."""
    if not directory:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"{client}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_state(context: Context, client: str, directory: str) -> ClientState:
    path = _state_file(directory, client)
    if path is not None and path.is_file():
        return ClientState.from_dict(json.loads(path.read_text()))
    if CLIENT_STATE in context.state:
        return ClientState.from_dict(json.loads(context.state[CLIENT_STATE]["json"]))
    return ClientState()


def save_state(context: Context, client: str, directory: str, state: ClientState) -> None:
    data = asdict(state)
    context.state[CLIENT_STATE] = ConfigRecord({"json": json.dumps(data)})
    path = _state_file(directory, client)
    if path is not None:
        write_json_atomic(path, {"client": client, **data})
