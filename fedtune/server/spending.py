"""The ledger's side of "ε never resets silently".

Each client remembers its own spending (client/state.py), and the server's ledger records what
each one reported. Two checks tie them together:
- Before a round, every train message carries the ledger's record of its client's spending, so a
  client whose own state holds less (lost or replaced) refuses to train (client/app.py). Nodes
  the server cannot name yet (a resumed simulation gives every node a new id) are asked who
  they are first, with one small `query.identify` message each.
- After a round, the server recomputes each reporting client's ε from the ledger's (σ, q, steps)
  with its own accountant, and marks an entry whose reported ε is below that `state_lost`.
And one the other way: a client whose reply never came (recorded `failed`, without figures) may
have trained and spent all the same. Its next train reply reports that spending (client/state.py's
`unrecorded`); after the run's last round there is no next one, so the server asks each such client
once, with a `query.unrecorded_spending` message that trains nothing (ask_unrecorded). A run that was
resumed asks every connected client: a crash or Ctrl-C during a round leaves no entry at all for the
clients still training then, and one that is not sampled again would otherwise never be asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import NamedTuple

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import constants as k
from fedtune.privacy.accountant import epsilon, merged
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtune.server.validate import Schedule, late_entry_problem, late_schedule_problem

# A reported ε may sit this far below the recomputed one before it counts as lost state: the two
# come from the same accountant and history, so only floating-point rounding separates them.
RELATIVE_TOLERANCE = 1e-6


def unnamed(grid: Grid, messages: list[Message], node_names: dict[int, str], ledger: PrivacyLedger) -> list[int]:
    """The nodes among `messages`' destinations that must say who they are: unknown to the server
    while the ledger holds spending by a client it cannot place on any connected node (a resumed
    simulation's nodes all have new ids; the checkpoint's names belong to the old ones)."""
    unknown = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in node_names]
    if not unknown:
        return []
    placed = {node_names[node] for node in grid.get_node_ids() if node in node_names}
    return unknown if set(ledger.clients) - placed else []


def identify(nodes: list[int], node_names: dict[int, str],
             send: Callable[[list[Message], str], list[Message]]) -> None:
    """Ask `nodes` their client names (`send` is the round loop's send-and-collect, Transport.send);
    a node that does not answer stays unnamed and trains without a ledger record to compare with."""
    queries = [Message(RecordDict(), dst_node_id=node, message_type=k.IDENTIFY) for node in nodes]
    for reply in send(queries, "identify"):
        info = None if reply.has_error() else reply.content.get(k.CLIENT_INFO)
        name = info.get(k.CLIENT_NAME) if isinstance(info, ConfigRecord) else None
        if isinstance(name, str) and name.strip():
            node_names[reply.metadata.src_node_id] = name


def with_recorded_spending(messages: list[Message], ledger: PrivacyLedger, node_names: dict[int, str]) -> None:
    """Give each train message to a client the server can name its own copy of the config, holding
    the ledger's record of that client's spending (empty for one it has no entry of) and the
    (round, steps) of the entries it holds; a client the server cannot name gets neither, and so
    neither refuses for lost state nor reports spending as unrecorded. Only that client's record
    goes to it: what other institutions spent stays with the server."""
    for message in messages:
        name = node_names.get(message.metadata.dst_node_id)
        if name:
            content = message.content
            config = ConfigRecord({**content[k.CONFIG], k.LEDGER_SPENT: json.dumps(merged(ledger.spent(name))),
                                   k.LEDGER_ROUNDS: json.dumps(ledger.rounds_held(name))})
            message.content = RecordDict({**{key: content[key] for key in content.keys()}, k.CONFIG: config})


# What one reply may report as unrecorded spending: a client that lost several rounds' replies reports each
# of them once, and rounds_per_client is at most 100,000 (config.py); a longer list is no client's.
MAX_UNRECORDED_ENTRIES = 1000
MAX_UNRECORDED_CHARS = 1_000_000


def flag_lost_state(ledger: PrivacyLedger, round_: int, delta: float) -> list[str]:
    """Recompute, for each client with an entry in `round_`, its ε from the ledger's history, and mark
    the entry `state_lost` when the ε it reported is lower. Returns the names flagged."""
    flagged = []
    for name, entries in ledger.clients.items():
        entry = next((e for e in reversed(entries) if e.round == round_ and e.reported), None)
        if entry is None:
            continue
        history = merged(ledger.spent(name))
        try:
            recomputed = epsilon(ledger.accountant, history, delta if entry.delta is None else entry.delta)
        except (ArithmeticError, MemoryError, RecursionError, ValueError):  # e.g. σ = 1e-300 divides by zero
            # A history no accountant can evaluate bounds nothing: fail closed, ε = ∞ as for lost
            # state (epsilon_recomputed says which), rather than fail the round.
            ledger.mark_state_lost(name, round_, math.inf)
            flagged.append(name)
            continue
        if math.isfinite(recomputed) and entry.epsilon < recomputed * (1 - RELATIVE_TOLERANCE):
            ledger.mark_state_lost(name, round_, recomputed)
            flagged.append(name)
    return flagged


def unrecorded_entries(info: ConfigRecord, schedule: Schedule | None = None) -> list[LedgerEntry]:
    """The entries a reply reports for spending the ledger has no record of (k.UNRECORDED); none
    when it reports none, or when any of them is malformed or implausible (late_entry_problem), or
    off the run's `schedule` under DP-SGD: a client can only add to its own record, so a bad list is
    dropped rather than failing the round."""
    text = info.get(k.UNRECORDED)
    if not isinstance(text, str) or len(text) > MAX_UNRECORDED_CHARS:
        return []
    try:
        rows = json.loads(text)
        entries = [LedgerEntry.from_dict(row) for row in rows] if isinstance(rows, list) else []
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: "[[[[…" nested past Python's limit
        return []
    if len(entries) > MAX_UNRECORDED_ENTRIES or any(
            entry.extra or late_entry_problem(entry) or (schedule and late_schedule_problem(entry, schedule))
            for entry in entries):  # a key fedtune does not write (`extra`) would be saved as sent, nested or huge
        return []
    return entries


def awaiting_report(ledger: PrivacyLedger) -> list[str]:
    """The clients whose last entry is a failure the server recorded without figures (no reply, or an
    error in its place): they may have trained in that round, and no later reply has reported it."""
    return [name for name, entries in ledger.clients.items()
            if entries and entries[-1].status == k.STATUS_FAILED and not entries[-1].reported]


class Asked(NamedTuple):
    recorded: list[str]  # the clients whose unrecorded spending is now on record
    silent: list[str]  # the clients asked that gave no valid answer (none, an error, or under another name)


def ask_unrecorded(ledger: PrivacyLedger, node_names: dict[int, str], connected: list[int], config: dict,
                   round_: int, send: Callable[[list[Message], str], list[Message]], everyone: bool = False,
                   schedule: Schedule | None = None) -> Asked:
    """After the last round (`round_`): ask each client awaiting_report on a `connected` node (with
    `everyone`, a resumed run: every connected client) for its unrecorded spending (the run's client
    `config` and the ledger's record of it, as a train message carries them), and record what it
    reports late (held to the run's `schedule`, as in a round). A reply that does not state the name
    its node is known by counts for nothing, as does no reply (`send` is the round loop's Transport).
    Connected nodes the server cannot name (a resumed simulation's, or one whose only reply never came
    and whose failure is on record as `node-N`) are asked who they are first (identify)."""
    waiting = awaiting_report(ledger)
    unknown = [node for node in connected if node not in node_names]
    placed = {node_names[node] for node in connected if node in node_names}
    if unknown and (everyone or (waiting and set(waiting) - placed)):
        identify(unknown, node_names, send)
        for node in unknown:
            if node in node_names:
                ledger.attribute(f"node-{node}", node_names[node])
        waiting = awaiting_report(ledger)
    node_of = {node_names[node]: node for node in connected if node in node_names}
    asked = sorted(node_of.values()) if everyone else [node_of[name] for name in waiting if name in node_of]
    if not asked:
        return Asked([], [])
    messages = [Message(RecordDict({k.CONFIG: ConfigRecord(dict(config))}), dst_node_id=node,
                        message_type=k.UNRECORDED_SPENDING) for node in asked]
    with_recorded_spending(messages, ledger, node_names)
    recorded, answered = [], set()
    for reply in send(messages, "unrecorded spending"):
        info = None if reply.has_error() else reply.content.get(k.CLIENT_INFO)
        name = node_names[reply.metadata.src_node_id]
        if isinstance(info, ConfigRecord) and info.get(k.CLIENT_NAME) == name:
            answered.add(name)
            if late := unrecorded_entries(info, schedule):
                ledger.record_late(name, round_, late)
                recorded.append(name)
    return Asked(recorded, [node_names[node] for node in asked if node_names[node] not in answered])
