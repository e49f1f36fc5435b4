"""What a client remembers between rounds: its privacy history.

It lives in Flower's Context state (kept by the SuperNode / the Simulation Engine between
rounds) and, when a state directory is known, in a file written atomically, so that it
survives a restart of the whole run. The file wins if both exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedtune.constants import CLIENT_STATE
from fedtune.durable import write_json_atomic
from fedtune.privacy.accountant import History, normalize


def _state_file(state_dir: str, client: str) -> Path | None:
    return Path(state_dir) / f"{client}.json" if state_dir else None


def load_history(context: Context, client: str, state_dir: str) -> History:
    path = _state_file(state_dir, client)
    if path is not None and path.is_file():
        return normalize(json.loads(path.read_text())["history"])
    if CLIENT_STATE in context.state:
        return normalize(json.loads(context.state[CLIENT_STATE]["history"]))
    return []


def save_history(context: Context, client: str, state_dir: str, history: History) -> None:
    encoded = json.dumps(history)
    context.state[CLIENT_STATE] = ConfigRecord({"history": encoded})
    path = _state_file(state_dir, client)
    if path is not None:
        write_json_atomic(path, {"client": client, "history": history})
