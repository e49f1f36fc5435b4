"""What a client remembers between rounds: its privacy history, the noise multiplier it solved
for (with dp.target_epsilon), and its own copy of its ledger entries.

It lives in Flower's Context state (kept by the SuperNode / the Simulation Engine between
rounds) and, when a state directory is known, in a file written atomically, so that it
survives a restart of the whole run or of the institution's SuperNode. The file wins if both
exist. The directory is the privacy policy's (privacy/policy.py): the node config's `state-dir`
(each institution sets its own in deployment), else, for a node training on a partition of the
run's own data, the one the server names (simulation: inside the run directory).

The server's ledger also records what each client spent. A client whose own state holds less
than that has lost it (a deleted file, a new machine, `lost_spending`): it refuses to train, since
its ε would restart from nothing, until its operator explicitly adopts the ledger's record. "Less"
is checked against its whole history (steps) and against its own entries of the run the ledger is
of ((σ, q) by (σ, q)): a state directory several runs share holds other runs' steps, which can
outnumber the ones a copy restored from an older backup lacks.
"""

from __future__ import annotations

import fcntl
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedtune import constants as k
from fedtune.durable import make_dirs_durable, write_json_atomic
from fedtune.errors import FedtuneError
from fedtune.privacy.accountant import History, merged, normalize
from fedtune.privacy.ledger import LedgerEntry


@dataclass
class ClientState:
    history: History = field(default_factory=list)  # Opacus accountant history: (sigma, q, steps) runs
    noise_multiplier: float | None = None  # solved once from dp.target_epsilon, then kept for the run
    ledger: list[LedgerEntry] = field(default_factory=list)  # this client's own round entries
    # Per run id ("" when the server sent none): the spending its operator adopted from the server's
    # ledger after a lost state (adopt-ledger-spending), which its own entries of that run lack.
    adopted: dict[str, History] = field(default_factory=dict)
    solved_in: str | None = None  # the run id noise_multiplier was solved in ("" when the server sent none)
    # Whether its history holds steps of record-level DP: a per-person ε cannot count those without group
    # privacy (`unit_conflict`). None: a state an earlier fedtune wrote, which did not record it (settle_unit).
    record_level: bool | None = False
    # Whether it holds steps of user-level DP: under dp.user_gradient = "mean" one record more or less
    # changes its person's clipped mean by up to 2C (a substitution), so a record-level ε, composed at
    # sensitivity C, cannot count them (`unit_conflict`). A state written before fedtune recorded it:
    # noised steps in one that says it holds no record-level ones can only be user-level; one that
    # records neither counts its other runs' steps as both (settle_unit).
    user_level: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientState:
        history, record_level = normalize(data.get("history", [])), data.get("record_level")
        noised = any(sigma > 0 and steps for sigma, _, steps in history)
        user_level = data["user_level"] if "user_level" in data else record_level is False and noised
        return cls(history, data.get("noise_multiplier"),
                   [LedgerEntry.from_dict(entry) for entry in data.get("ledger", [])],
                   {run: normalize(history) for run, history in data.get("adopted", {}).items()},
                   data.get("solved_in"), record_level, bool(user_level))

    def to_dict(self) -> dict[str, Any]:
        return {"history": [list(run) for run in self.history], "noise_multiplier": self.noise_multiplier,
                "solved_in": self.solved_in, "record_level": self.record_level, "user_level": self.user_level,
                "ledger": [entry.to_dict() for entry in self.ledger],
                **({"adopted": {run: [list(r) for r in h] for run, h in self.adopted.items()}} if self.adopted else {})}


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
    make_dirs_durable(Path(directory))  # its entry survives a power loss with the state saved in it
    with open(Path(directory) / f"{client}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class DamagedState(FedtuneError):
    """The client's state file cannot be read: its spending is unknown."""


def load_state(context: Context, client: str, directory: str) -> ClientState:
    path = _state_file(directory, client)
    if path is not None and path.is_file():
        try:
            return ClientState.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON and Unicode errors are ValueErrors
            raise DamagedState(
                f"this node's privacy state file {path} is damaged ({type(err).__name__}), so what it spent is "
                "unknown; the file is left as it is. Restore it from a backup; or move it away and set "
                f"`{k.NODE_ADOPT_LEDGER_SPENDING} = true` in the node config to continue from the server's "
                "ledger record") from err
    if k.CLIENT_STATE in context.state:
        return ClientState.from_dict(json.loads(context.state[k.CLIENT_STATE]["json"]))
    return ClientState()


def save_state(context: Context, client: str, directory: str, state: ClientState) -> None:
    data = state.to_dict()
    context.state[k.CLIENT_STATE] = ConfigRecord({"json": json.dumps(data)})
    path = _state_file(directory, client)
    if path is not None:
        write_json_atomic(path, {"client": client, **data})


def steps_in(history: History) -> int:
    return sum(steps for _, _, steps in history)


def spent(state: ClientState, history: History, unit: str | None) -> None:
    """`history` is now its spending, taken under DP of `unit` (dp.unit; None: without DP, whose ε is ∞)."""
    more = steps_in(history) > steps_in(state.history)
    state.record_level = bool(state.record_level) or (unit == "record" and more)
    state.user_level = state.user_level or (unit == "user" and more)
    state.history = history


def settle_unit(state: ClientState, run: str | None) -> None:
    """A state an earlier fedtune wrote does not say whether its steps were record-level. Those of its own
    entries of run `run` and what it adopted for it are this run's, of this run's unit; steps beyond them
    came from other runs of either unit, and count as both (no run of either unit counts them)."""
    if state.record_level is None:
        own = sum(entry.steps or 0 for entry in _this_run(state, run)) + steps_in(_adopted(state, run))
        state.record_level = steps_in(state.history) > own
        state.user_level = state.user_level or state.record_level  # either unit: neither may count them


def unit_conflict(state: ClientState, unit: str) -> str | None:
    """Why a round under DP of `unit` cannot count this state's spending, or None. A record-level step
    bounds one record's influence, not one person's: a person with several records spent more in it
    (group privacy), so a per-person ε composed over it would understate what that person spent. And
    a user-level step bounds a person's add/remove at C, not one record's change within a person."""
    if unit == "record" and state.user_level:
        return ("this node's privacy state holds user-level DP-SGD steps, in which one record more or less "
                "could change its person's clipped gradient by up to 2C, and a record-level ε composed at "
                "sensitivity C would understate them. Train record-level runs under their own client-name or "
                "state-dir, and count the user-level spending separately")
    if unit != "user" or not state.record_level:
        return None
    return ("this node's privacy state holds record-level DP-SGD steps (or, in a state an earlier fedtune "
            "wrote, another run's steps of an unrecorded unit), and a per-person ε cannot count them without "
            "group privacy; it would understate what a person with several records spent. Train user-level runs "
            "under their own client-name or state-dir, and count the record-level spending separately")


def spent_on_ledger(record: ConfigRecord) -> History:
    """The server's ledger record of this client's spending, sent with each train message; empty
    when the server has none (a new client, or one the server cannot name yet)."""
    text = record.get(k.LEDGER_SPENT, "")
    return normalize(json.loads(text)) if isinstance(text, str) and text else []


def _this_run(state: ClientState, run: str | None) -> list[LedgerEntry]:
    """Its own entries of run `run` (all of them when the server sends no run id); entries written
    before they named their run count as this run's."""
    return [entry for entry in state.ledger if run is None or entry.run in (run, None)]


def _adopted(state: ClientState, run: str | None) -> History:
    return [part for key, history in state.adopted.items() if run is None or key in (run, "") for part in history]


def _recorded(state: ClientState, run: str | None, held: list[tuple[int, int]] | None) -> list[LedgerEntry]:
    """Its own entries of run `run` that took steps and that the server's ledger holds (by (round,
    steps), `held`; all of them when the server sent no such list). One the ledger lacks (a reply it
    never got) is `unrecorded`'s to report, and must not stand in for an entry the state lost."""
    own = [entry for entry in _this_run(state, run) if entry.steps]
    if held is None:
        return own
    left, recorded = Counter(held), []
    for entry in own:
        if left[(entry.round, entry.steps)] > 0:
            left[(entry.round, entry.steps)] -= 1
            recorded.append(entry)
    return recorded


def ledger_shortfall(state: ClientState, ledger: History, run: str | None = None,
                     held: list[tuple[int, int]] | None = None) -> History:
    """The spending the server's record of this client in run `run` (`ledger`, with the (round, steps)
    of its entries, `held`) holds beyond its own entries of that run that it recorded, and what it
    adopted, (σ, q) by (σ, q): composition does not depend on the order. Empty while its state is whole."""
    left = Counter()
    own = [(e.noise_multiplier, e.sample_rate, e.steps) for e in _recorded(state, run, held)
           if e.noise_multiplier is not None and e.sample_rate is not None]
    for sigma, q, steps in normalize([*own, *_adopted(state, run)]):
        left[(sigma, q)] += steps
    out = []
    for sigma, q, steps in merged(ledger):
        taken = min(steps, left[(sigma, q)])
        left[(sigma, q)] -= taken
        if steps > taken:
            out.append((sigma, q, steps - taken))
    return out


def adopt_ledger_spending(state: ClientState, ledger: History, run: str | None = None,
                          held: list[tuple[int, int]] | None = None) -> None:
    """The operator's explicit continuation after a lost state: the ledger's spending that its own
    records of the run lack joins its history, whatever else that holds (another run's spending
    stays), and is kept as adopted for the run, so the next round finds the state whole. A history
    that still holds fewer steps than the ledger (damaged apart from its entries) becomes the ledger's."""
    gap = ledger_shortfall(state, ledger, run, held)
    state.adopted[run or ""] = [*state.adopted.get(run or "", []), *gap]
    state.history = [*state.history, *gap]
    if steps_in(state.history) < steps_in(ledger):
        state.history = list(ledger)


def known_history(state: ClientState, ledger: History, run: str | None = None,
                  held: list[tuple[int, int]] | None = None) -> History:
    """Its history with whatever the server's record holds beyond its own records: what its ε is at
    least (the ledger's, where that has more steps still)."""
    history = [*state.history, *ledger_shortfall(state, ledger, run, held)]
    return ledger if steps_in(ledger) > steps_in(history) else history


def rounds_on_ledger(record: ConfigRecord) -> list[tuple[int, int]] | None:
    """(round, steps) of the entries with steps that the server's ledger holds for this client;
    None when the server sent none (it could not name this client)."""
    text = record.get(k.LEDGER_ROUNDS)
    if not isinstance(text, str):
        return None
    return [(int(round_), int(steps)) for round_, steps in json.loads(text)]


def unrecorded(state: ClientState, ledger: History, held: list[tuple[int, int]] | None,
               run: str | None = None) -> list[LedgerEntry]:
    """This client's own entries of this run (`run`, the run directory's id) for spending that the
    server's ledger lacks: those that took steps and are not among the (round, steps) it holds
    (`held`). That happens when the server stopped before it recorded a reply (a crash during
    training) or recorded a timed-out reply as a failure. Reported only when they add up exactly to
    the steps its record (`ledger`) is short of, so nothing is ever counted twice; none when the
    server could not name this client (`held` None). Another run's spending in this institution's
    state directory is not this run's to record: it stays in the client's history, and so in the ε
    it reports. Entries written before they named their run, or a server that sends no run id,
    count as this run's."""
    own = _this_run(state, run)
    missing = sum(entry.steps or 0 for entry in own) + steps_in(_adopted(state, run)) - steps_in(ledger)
    if held is None or missing <= 0:
        return []
    left = Counter(held)
    late = []
    for entry in own:
        if entry.steps and left[(entry.round, entry.steps)] > 0:
            left[(entry.round, entry.steps)] -= 1
        elif entry.steps:
            late.append(entry)
    return late if sum(entry.steps for entry in late) == missing else []


def lost_spending(state: ClientState, ledger: History, run: str | None = None,
                  held: list[tuple[int, int]] | None = None) -> str | None:
    """Why this node's own state cannot be the whole of its spending: the server's ledger records
    spending in run `run` that it lacks (a deleted file, a new machine, a copy restored from before
    some rounds), in its history or among its own entries of the run; None when it lacks nothing.
    Checking the history alone missed a restored copy whose other runs' steps outnumber the lost
    ones. More than the ledger is normal (a reply the server never got)."""
    if steps_in(state.history) >= steps_in(ledger) and not ledger_shortfall(state, ledger, run, held):
        return None
    own = sum(entry.steps or 0 for entry in _this_run(state, run)) + steps_in(_adopted(state, run))
    return (f"this node's privacy state records {min(own, steps_in(state.history))} DP-SGD steps of this run, but "
            f"the server's ledger records {steps_in(ledger)} for it: the state was lost, replaced or restored from an "
            "older copy, and its ε must not go back with it")
