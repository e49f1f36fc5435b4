"""The round loop: send, collect, aggregate, evaluate, commit.

Flower's Strategy.start() runs rounds too, but it cannot resume from a checkpoint and has no
per-round hook for committing state or showing progress. This loop calls the same four
strategy hooks (configure/aggregate train and evaluate) in the same order, so any Flower
strategy or strategy wrapper plugs in unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.errors import FedtuneError
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger, client_notes, one_line
from fedtune.server.evaluate import ServerEvaluator
from fedtune.server.identity import Registry
from fedtune.server.run_dir import Checkpoint, RunDirectory, model_options
from fedtune.server.schedule import find_plateau, last_round, round_learning_rate
from fedtune.server.secagg import secure_exchange
from fedtune.server.spending import (
    ask_unrecorded,
    awaiting_report,
    flag_lost_state,
    identify,
    unnamed,
    unrecorded_entries,
    with_recorded_spending,
)
from fedtune.server.validate import (
    Schedule,
    bounded_weights,
    evaluation_problem,
    for_aggregation,
    reject_malformed,
    reported_spending,
)
from fedtune.strategies.wrapper import load_state_dict, state_dict
from fedtune.tasks.base import Scores

PULL_INTERVAL_S = 0.1
NO_REPLY = "no reply before timeout (round_timeout_s)"
NOT_SENT = "the message could not be sent to the node"
UNRECORDED_TIMEOUT_S = 120.0  # how long a finished run waits for unrecorded spending (_record_unreported)
UNRECORDED_PER_CLIENT_S = 1.0  # and this more for each client asked (about 0.1 s a message on 2 cores, bench/)
FAILURES_LOG = "failures.log"  # in the run directory: the whole text of failures the ledger keeps one line of


@dataclass
class RoundInputs:
    """What the loop needs besides the strategy: config, run directory, evaluator, console."""

    cfg: FedtuneConfig
    run: RunDirectory
    evaluate: ServerEvaluator
    console: Console = field(default_factory=Console)
    timeout_s: float | None = None
    worker_peak_rss_mb: dict[int, float] = field(default_factory=dict)  # per client process, this session
    ray_nodes: dict[str, int] = field(default_factory=dict)  # simulation: replies per Ray node, this session
    stop: threading.Event = field(default_factory=threading.Event)  # set on Ctrl-C: stop at once, commit nothing
    resumed: bool = False  # continuing a run directory: after the last round every client is asked (_record_unreported)


class RunStopped(Exception):
    """The run was asked to stop (Ctrl-C) during round `round`; rounds before it are committed.
    `after_last`: every round is committed, and it stopped while asking for unrecorded spending."""

    def __init__(self, round_: int, after_last: bool = False) -> None:
        super().__init__(f"stopped after round {round_}" if after_last else f"stopped during round {round_}")
        self.round, self.after_last = round_, after_last


def exchange(grid: Grid, messages: Iterable[Message], label: str, progress: Progress,
             timeout_s: float | None, max_in_flight: int | None = None,
             stop: threading.Event | None = None) -> list[Message]:
    """Push `messages`, then pull replies until all are back (or the timeout), with a bar.

    Every message gets exactly one reply, attributed to the node it was sent to: one that could
    not be sent, or got no reply before the timeout (an institution whose SuperNode died or
    hangs), is answered here with an error reply naming why, so the caller records that node as
    failed and goes on with the others. Errors the SuperLink makes itself (e.g. "node
    unavailable" once a node's heartbeat lapses) come from the SuperLink's own node id; they are
    re-addressed to the node they are about.

    `max_in_flight` keeps at most that many messages pushed and unanswered (None: push all at
    once). Simulation needs it: see in_flight_limit. Once `stop` is set it returns at the next poll
    with the replies that really came, and makes up none for the others: they did not fail."""
    waiting = list(messages)
    by_id: dict[str, Message] = {}
    replies: list[Message] = []
    pending: set[str] = set()
    task = progress.add_task(label, total=len(waiting), eps="")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def pull() -> bool:
        """Collect the replies that have come; whether there were any."""
        got = [m for m in grid.pull_messages(pending) if m.metadata.reply_to_message_id in pending] if pending else []
        replies.extend(_from_addressee(m, by_id[m.metadata.reply_to_message_id]) for m in got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        progress.update(task, completed=len(replies), eps=_epsilon_so_far(replies))
        return bool(got)

    while (waiting or pending) and (deadline is None or time.monotonic() < deadline) and not _stopping(stop):
        room = len(waiting) if max_in_flight is None else max(0, max_in_flight - len(pending))
        batch, waiting = waiting[:room], waiting[room:]
        sent = set(filter(None, grid.push_messages(batch))) if batch else set()  # the grid sets each id
        by_id.update({m.metadata.message_id: m for m in batch if m.metadata.message_id in sent})
        replies.extend(failed_reply(m, NOT_SENT) for m in batch if m.metadata.message_id not in sent)
        pending |= sent
        if not pull() and pending:
            time.sleep(PULL_INTERVAL_S)
    if pending and not _stopping(stop):
        pull()  # past the deadline: a reply that came during the last wait still counts
    progress.remove_task(task)
    if _stopping(stop):
        return replies
    unsent = [failed_reply(m, NO_REPLY) for m in waiting]  # the phase timed out before they could be sent
    return replies + [failed_reply(by_id[message_id], NO_REPLY) for message_id in sorted(pending)] + unsent


def _stopping(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def in_flight_limit(grid: Grid) -> int | None:
    """How many messages to keep in flight at once: all of them (None) against a SuperLink, whose
    nodes train in parallel; a few per CPU on `fedtune simulate`'s grid, whose in-memory
    SuperLink scans every registered node against every stored message ten times a second
    (vce_api.add_messages_to_queue): with 100 messages in flight that scan takes a core, and it
    grows with the registered nodes. The simulation's workers can take at most one per CPU anyway."""
    return 4 * (os.cpu_count() or 1) if isinstance(grid, InMemoryGrid) else None


def failed_reply(instruction: Message, reason: str, code: int = ErrorCode.UNKNOWN) -> Message:
    """An error reply to `instruction`, made by the server for a node that could not answer it."""
    return Message(Error(code=code, reason=reason), reply_to=instruction)


def _from_addressee(reply: Message, instruction: Message) -> Message:
    if reply.has_error() and reply.metadata.src_node_id != instruction.metadata.dst_node_id:
        return failed_reply(instruction, reply.error.reason, reply.error.code)
    return reply


def _epsilon_so_far(replies: list[Message]) -> str:
    """The highest ε among this phase's replies so far, for the progress line."""
    spent = [r.content[k.METRICS][k.EPSILON] for r in replies
             if not r.has_error() and k.METRICS in r.content and k.EPSILON in r.content[k.METRICS]]
    # Unchecked replies: a malformed value is skipped here and rejected after the exchange.
    finite = [float(e) for e in spent if isinstance(e, int | float) and math.isfinite(e)]
    return f"ε max {max(finite):.2f}" if finite else ""


def _track_memory(peaks: dict[int, float], replies: list[Message]) -> None:
    for reply in replies:
        m = None if reply.has_error() else reply.content[k.METRICS]
        if m is not None and k.PID in m and k.PEAK_RSS_MB in m:
            peaks[int(m[k.PID])] = max(peaks.get(int(m[k.PID]), 0.0), float(m[k.PEAK_RSS_MB]))


def _track_ray_nodes(counts: dict[str, int], replies: list[Message]) -> None:
    for reply in replies:
        info = None if reply.has_error() else reply.content.get(k.CLIENT_INFO)
        node = info.get(k.RAY_NODE) if isinstance(info, ConfigRecord) else None
        if isinstance(node, str):
            counts[node] = counts.get(node, 0) + 1


def record_privacy(ledger: PrivacyLedger, round_: int, replies: list[Message], node_names: dict[int, str],
                   refused: dict[int, tuple[str, MetricRecord, list[LedgerEntry]]] | None = None,
                   schedule: Schedule | None = None) -> None:
    """One ledger entry per client that answered (trained or declined), failed, or had its update
    refused this round, each after the spending the client reports the ledger lacks (recorded late,
    held to the run's `schedule`). `refused` (from _refuse_malformed) holds, by node, the name, privacy
    figures and late entries a refused reply reported: that client trained, so its entry carries the ε
    it spent."""
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() and node in (refused or {}):
            name, metrics, late = refused[node]
            _learn_name(ledger, node_names, node, name)
            ledger.record_late(name, round_, late)
            ledger.record_round(name, round_, k.STATUS_REJECTED, metrics, reason=reply.error.reason)
        elif reply.has_error():
            ledger.record_failure(node_names.get(node, f"node-{node}"), round_, reply.error.reason)
        else:
            info = reply.content[k.CLIENT_INFO]
            name = str(info[k.CLIENT_NAME])
            _learn_name(ledger, node_names, node, name)
            # before this round's entry: they came first
            ledger.record_late(name, round_, unrecorded_entries(info, schedule))
            ledger.record_round(name, round_, str(info[k.STATUS]), reply.content[k.METRICS], **client_notes(info))


def name_registered(node_names: dict[int, str], registry: Registry, nodes: list[int]) -> None:
    """Know each asked node by its registered name (deployment), which its replies must state too
    (_refuse_misnamed): a node that fails before it ever answered is then recorded under its
    institution's name, not as an extra `node-N`."""
    for node in nodes:
        if node in registry.names:
            node_names.setdefault(node, registry.names[node])


MAX_LOGGED_REASON = 20_000  # characters of one failure's text in failures.log


def _log_failures(log: Path, round_: int, replies: list[Message], node_names: dict[int, str]) -> None:
    """The whole text of each failure whose ledger entry keeps one line of it (a worker's traceback)."""
    long = [(r.metadata.src_node_id, r.error.reason) for r in replies
            if r.has_error() and one_line(r.error.reason) != r.error.reason.strip()]
    if long:
        with log.open("a", encoding="utf-8") as out:
            for node, reason in long:  # a traceback fits; a node's reason past that is cut (it writes every round)
                over = len(reason) - MAX_LOGGED_REASON
                cut = f"\n[... {over} more characters]" if over > 0 else ""
                out.write(f"--- round {round_}, {node_names.get(node, f'node-{node}')}\n"
                          f"{reason[:MAX_LOGGED_REASON].rstrip()}{cut}\n")


def _learn_name(ledger: PrivacyLedger, node_names: dict[int, str], node: int, name: str) -> None:
    """Remember a node's client name, and move failures recorded before it was known under it."""
    node_names[node] = name
    ledger.attribute(f"node-{node}", name)


def _refuse_malformed(replies: list[Message], reference: ArrayRecord, instructions: list[Message], round_: int,
                      console: Console, max_update_norm: float = math.inf, lower_rank: bool = False,
                      schedule: Schedule | None = None, known: dict[int, str] | None = None
                      ) -> tuple[list[Message], dict[int, tuple[str, MetricRecord, list[LedgerEntry]]]]:
    """Replace each malformed (or too large) reply (server/validate.py) by an error reply naming what
    is wrong, left out of aggregation like any other failure. Also returns, by node, the name and
    privacy figures of refused replies that still report them well formed and on the run's schedule
    (record_privacy), under the name its node is `known` by (registered, or stated before): a refused
    reply stating another name is recorded as its node's failure, so it cannot put figures on another
    institution's record or rename its node. A reply is checked against what its node was sent
    (heterogeneous ranks: its rank's view)."""
    by_node = {m.metadata.dst_node_id: m for m in instructions}  # one train message per node and round
    sent = {node: m.content[k.ARRAYS] for node, m in by_node.items() if k.ARRAYS in m.content}
    kept, rejected = reject_malformed(replies, reference, max_update_norm, sent, lower_rank, schedule)
    refused = {}
    for reply, reason in rejected:
        node = reply.metadata.src_node_id
        console.print(f"round {round_}: rejected the update from node {node}: {reason}",
                      markup=False, highlight=False, soft_wrap=True)
        kept.append(failed_reply(by_node[node], f"update rejected: {reason}"))
        spending = reported_spending(reply, schedule)
        if spending and (known or {}).get(node, spending[0]) == spending[0]:
            refused[node] = (*spending, unrecorded_entries(reply.content[k.CLIENT_INFO], schedule))
    return kept, refused


def _mean_bytes_sent(messages: list[Message]) -> float:
    """Adapter bytes per train message (heterogeneous ranks: a lower rank gets fewer); 0 if none."""
    sizes = [m.content[k.ARRAYS].count_bytes() for m in messages if k.ARRAYS in m.content]
    return sum(sizes) / len(sizes) if sizes else 0.0


def initial_checkpoint(inputs: RoundInputs, arrays: ArrayRecord) -> Checkpoint:
    """Round 0: the initial adapter and its server-side evaluation, before any training."""
    scores = inputs.evaluate(arrays, 0)
    ledger = PrivacyLedger(inputs.cfg.dp.accounting, inputs.cfg.dp.enabled, unit=inputs.cfg.dp.unit)
    row = _round_row(0, scores, None, None, ledger, [], [], bytes_down=0)
    return Checkpoint(0, dict(arrays.to_torch_state_dict()), [row], ledger.to_dict(), {},
                      options=model_options(inputs.cfg))


@dataclass(frozen=True)
class Transport:
    """How this run's messages travel, chosen once per run: through SecAgg+ for training when
    dp.secagg is on (server/secagg.py needs every participant's message at once), otherwise pushed
    and pulled by `exchange`, with at most `max_in_flight` in flight (in_flight_limit)."""

    grid: Grid
    progress: Progress
    timeout_s: float | None
    stop: threading.Event
    secure: bool
    max_in_flight: int | None

    @classmethod
    def of(cls, grid: Grid, inputs: RoundInputs, progress: Progress) -> Transport:
        return cls(grid, progress, inputs.timeout_s, inputs.stop, inputs.cfg.dp.secagg, in_flight_limit(grid))

    def send(self, messages: Iterable[Message], label: str) -> list[Message]:
        return exchange(self.grid, messages, label, self.progress, self.timeout_s, self.max_in_flight, self.stop)

    def train(self, messages: list[Message], label: str) -> list[Message]:
        if self.secure:
            return secure_exchange(self.grid, messages, label, self.progress, self.timeout_s)
        return self.send(messages, label)


@dataclass(frozen=True)
class _Trained:
    """What a round's training phase leaves for aggregation and the round's row."""

    messages: list[Message]  # the train messages sent
    replies: list[Message]  # one per message: an answer, or an error reply naming why not
    trained: list[Message]  # the answers that carry an update


def run_rounds(grid: Grid, strategy: Strategy, inputs: RoundInputs, start: Checkpoint) -> Checkpoint:
    """Run rounds start.round+1 .. cfg.rounds, committing each; returns the last checkpoint."""
    state = start
    ledger = inputs.run.ledger_to_resume(start)
    # Server optimizer moments from the checkpoint; client-level DP's releases so far and adaptive
    # clipping norm from the ledger (strategies/wrapper.py: each layer takes its own part).
    load_state_dict(strategy, {"server_optimizer": start.optimizer_state, "client_level": ledger.client_level})
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[eps]}"))
    # Live bars only on a terminal: in CI and other logs, the one line per round below is enough.
    with Progress(*columns, console=inputs.console, transient=True, disable=not inputs.console.is_terminal) as progress:
        transport = Transport.of(grid, inputs, progress)
        for round_ in range(start.round + 1, inputs.cfg.rounds + 1):
            if _ends_after(inputs, state):
                break
            state = _round(round_, transport, strategy, inputs, state, ledger)
        return _record_unreported(transport, inputs, state, ledger)


def _record_unreported(transport: Transport, inputs: RoundInputs, state: Checkpoint,
                       ledger: PrivacyLedger) -> Checkpoint:
    """After the last round: the spending of clients whose last reply never came, asked for
    (server/spending.py::ask_unrecorded) and put on record, so the ledger, report and last metrics row
    a finished run leaves count it. In a resumed run every connected client is asked: the clients a
    crash or Ctrl-C cut off mid-round have no entry at all (the round's replies were never recorded),
    and one not sampled again since has reported nothing. Written like a round's spending: the
    ledger first, then the checkpoint again (a crash between the two: PrivacyLedger.record_interrupted). Waits at most
    UNRECORDED_TIMEOUT_S (or the round timeout, if shorter), plus UNRECORDED_PER_CLIENT_S for each
    connected client (a resumed simulation of thousands asks them all), and names the clients that did
    not answer. Ctrl-C meanwhile stops the run before its summary is written, so that `--resume` asks
    again."""
    if not ledger.dp_enabled or not (inputs.resumed or awaiting_report(ledger)):
        return state
    registry = Registry.of(transport.grid)
    excluded = registry.exclusions(dict(state.node_keys))  # server/identity.py, as for training
    connected = [node for node in transport.grid.get_node_ids() if node not in excluded]
    timeout = min(transport.timeout_s or UNRECORDED_TIMEOUT_S, UNRECORDED_TIMEOUT_S) + \
        UNRECORDED_PER_CLIENT_S * len(connected)
    name_registered(state.node_names, registry, connected)  # as in a round
    before = ledger.to_dict()
    cfg = inputs.cfg
    schedule = Schedule.of(cfg, cfg.train.learning_rate, cfg.strategy.proximal_mu)  # its q and steps, as in rounds
    asked = ask_unrecorded(ledger, state.node_names, connected, client_config(cfg, inputs.run, transport.grid),
                           state.round, dataclasses.replace(transport, timeout_s=timeout).send,
                           everyone=inputs.resumed, schedule=schedule)
    if ledger.to_dict() != before:  # spending recorded, or a failure moved to the client it is now known as
        ledger.save(inputs.run.path)
        last = {**state.metrics[-1], "epsilon_max": ledger.epsilon_max()}
        state = dataclasses.replace(state, ledger=ledger.to_dict(), metrics=[*state.metrics[:-1], last])
        inputs.run.commit(state)
    if asked.recorded:
        inputs.console.print(f"After round {state.round}: the spending of {', '.join(asked.recorded)} in rounds whose "
                             "replies never came is now in the ledger (recorded_late).", markup=False,
                             highlight=False, soft_wrap=True)
    if asked.silent and not inputs.stop.is_set():
        few = ", ".join(asked.silent[:5]) + (f" and {len(asked.silent) - 5} more" if len(asked.silent) > 5 else "")
        inputs.console.print(f"After round {state.round}: {few} did not answer the question for spending the ledger "
                             f"lacks within {timeout:.0f} s; what they spent in a round whose reply never came is not "
                             "in the ledger or the report. Their own state holds it, and they report it when a "
                             "resumed or extended run of this one asks again.", markup=False, highlight=False,
                             soft_wrap=True)
    if inputs.stop.is_set():
        raise RunStopped(state.round, after_last=True)
    return state


def _ends_after(inputs: RoundInputs, state: Checkpoint) -> bool:
    """Whether the run ends after state.round (early_stopping_patience, then cooldown_rounds, in
    server/schedule.py); says so, and says when a cooldown begins."""
    cfg = inputs.cfg
    plateau = find_plateau(state.metrics, cfg.early_stopping_patience)
    if plateau is None:
        return False
    stalled = (f"the clients' validation loss has not improved on round {plateau.best}'s for "
               f"{plateau.ran_out - plateau.best} rounds")
    if state.round < last_round(cfg, state.metrics):
        if state.round == plateau.ran_out:
            inputs.console.print(f"After round {state.round} {stalled} (early_stopping_patience): the learning rate "
                                 f"now falls towards zero over {cfg.cooldown_rounds} rounds, then the run stops "
                                 f"(cooldown_rounds).", highlight=False, markup=False, soft_wrap=True)
        return False
    if cfg.cooldown_rounds:
        stalled = (f"by round {plateau.ran_out} {stalled}, and the learning rate has cooled down over "
                   f"{state.round - plateau.ran_out} rounds since (early_stopping_patience, cooldown_rounds)")
    else:
        stalled += " (early_stopping_patience)"
    inputs.console.print(f"Stopping early after round {state.round}: {stalled}.", highlight=False, markup=False,
                         soft_wrap=True)
    return True


def _round(round_: int, transport: Transport, strategy: Strategy, inputs: RoundInputs, state: Checkpoint,
           ledger: PrivacyLedger) -> Checkpoint:
    """One round, from the train messages to its commit; returns the committed checkpoint."""
    cfg, started = inputs.cfg, time.monotonic()
    arrays = ArrayRecord(torch_state_dict=state.arrays)
    learning_rate = round_learning_rate(cfg, round_, state.metrics)
    config = ConfigRecord({**client_config(cfg, inputs.run, transport.grid), k.LEARNING_RATE: learning_rate})
    phase = _train(round_, transport, strategy, inputs, state, ledger, arrays, config)
    if cfg.data.canaries and not cfg.dp.secagg:  # audited: the server's view, for `fedtune audit --vantage server`
        inputs.run.save_observed(round_, {state.node_names[r.metadata.src_node_id]: dict(
            r.content[k.ARRAYS].to_torch_state_dict()) for r in phase.trained})
    bytes_down = _mean_bytes_sent(phase.messages) or arrays.count_bytes()
    arrays, train_metrics = _aggregate(round_, strategy, inputs, ledger, arrays, phase.trained)
    train_s = time.monotonic() - started
    eval_messages = list(strategy.configure_evaluate(round_, arrays, ConfigRecord(dict(config)), transport.grid))
    eval_replies = transport.send(eval_messages, f"round {round_}/{cfg.rounds} evaluate")
    _stop_here(inputs, round_)
    client_eval = strategy.aggregate_evaluate(round_, _usable_evaluations(eval_replies, eval_messages, round_,
                                                                          inputs.console))
    scores = inputs.evaluate(arrays, round_)
    row = _round_row(round_, scores, train_metrics, client_eval, ledger, phase.trained, phase.replies,
                     bytes_down, train_s=train_s, round_s=time.monotonic() - started)
    row["learning_rate"] = learning_rate
    state = dataclasses.replace(state, round=round_, arrays=dict(arrays.to_torch_state_dict()),
                                metrics=[*state.metrics, row], ledger=ledger.to_dict(),
                                optimizer_state=state_dict(strategy).get("server_optimizer", {}))
    inputs.run.commit(state)
    inputs.console.print(_round_line(row, cfg.rounds), soft_wrap=True)
    if not row["num_clients"]:
        inputs.console.print(f"[yellow]No client trained in round {round_} ({_not_trained(row) or 'none answered'}), "
                             "so the model did not change. privacy_ledger.json gives each client's reason; a client "
                             "declines once another round would take it past its ε budget.[/yellow]",
                             highlight=False, soft_wrap=True)
    return state


def client_config(cfg: FedtuneConfig, run: RunDirectory, grid: Grid) -> dict[str, Any]:
    """What each train and evaluate message tells the clients: the options they train by
    (FedtuneConfig.client_flat), the run's id, and in simulation where the clients keep their state (in the run
    directory; a deployed institution names its own in its node config)."""
    flat: dict[str, Any] = {**cfg.client_flat(), k.RUN_ID: run.run_id}
    if isinstance(grid, InMemoryGrid):
        flat[k.CLIENT_STATE_DIR] = str(run.client_state_dir.resolve())
    return flat


def _train(round_: int, transport: Transport, strategy: Strategy, inputs: RoundInputs, state: Checkpoint,
           ledger: PrivacyLedger, arrays: ArrayRecord, config: ConfigRecord) -> _Trained:
    """Send the round's train messages, check and record every reply, and save the ledger."""
    cfg, grid = inputs.cfg, transport.grid
    registry = Registry.of(grid)  # who each node is registered as (deployment; nobody in simulation)
    messages = _without_unidentified(registry, list(strategy.configure_train(round_, arrays, config, grid)),
                                     ledger, state.node_keys, round_, inputs.console)
    name_registered(state.node_names, registry, [m.metadata.dst_node_id for m in messages])
    if unknown := unnamed(grid, messages, state.node_names, ledger):  # e.g. every node of a resumed simulation
        identify(unknown, state.node_names, transport.send)
    _stop_here(inputs, round_)
    with_recorded_spending(messages, ledger, state.node_names)  # a client that lost its state refuses
    if cfg.dp.secagg and len(messages) == 1:
        # SecAgg+ cannot hide a single update. Leaving the one institution out (a noise-only release, as
        # an earlier fedtune did) is not covered by client-level DP's analysis either: whether its update
        # is summed would then depend on whether another institution took part, a shift of up to 2 C.
        raise FedtuneError(f"Round {round_}: only one institution was asked (the others are not connected, or "
                           "their identity is in doubt), and SecAgg+ cannot hide a single update; the round is not "
                           f"run. Once others are connected, {inputs.run.how_to_continue()}.")
    replies = transport.train(messages, f"round {round_}/{cfg.rounds} train")
    mu = cfg.strategy.proximal_mu if cfg.strategy.name == "fedprox" else 0.0
    schedule = Schedule.of(cfg, float(config[k.LEARNING_RATE]), mu, _sent_clipping_norm(messages))
    replies, refused = _refuse_malformed(replies, arrays, messages, round_, inputs.console,
                                         cfg.strategy.max_update_norm, lower_rank=bool(cfg.lora.ranks()),
                                         schedule=schedule, known=state.node_names)
    replies = _refuse_misnamed(replies, registry, messages)
    record_privacy(ledger, round_, replies, state.node_names, refused, schedule)
    _log_failures(inputs.run.path / FAILURES_LOG, round_, replies, state.node_names)
    for name in flag_lost_state(ledger, round_, cfg.dp.delta):
        why = ("its recorded history could not be accounted, so its ε is recorded as ∞"
               if math.isinf(next(e for e in reversed(ledger.entries(name)) if e.state_lost).epsilon_recomputed)
               else
               "reported a lower ε than the ledger's record implies; its privacy state was lost")
        inputs.console.print(f"round {round_}: {name} {why} (marked state_lost in the ledger)",
                             markup=False, highlight=False, soft_wrap=True)
    _track_memory(inputs.worker_peak_rss_mb, replies)
    _track_ray_nodes(inputs.ray_nodes, replies)
    # The round's one ledger write (a second one in _aggregate under client-level DP): the spending the
    # clients reported is on disk before anything else can fail (too few replies, aggregation,
    # evaluation, a crash), and a resume keeps it (RunDirectory.ledger_to_resume). Committing the
    # round does not write the ledger again: nothing in it changes after this point.
    ledger.save(inputs.run.path)
    _stop_here(inputs, round_)  # Ctrl-C: only the replies that really came are on record
    answered = [r for r in replies if not r.has_error()]
    _require_quorum(round_, messages, replies, cfg.strategy.min_reply_fraction)
    _stop_if_all_refused(round_, answered)
    trained = [r for r in answered if r.content[k.CLIENT_INFO][k.STATUS] == k.STATUS_TRAINED]
    return _Trained(messages, replies, trained)


def _sent_clipping_norm(messages: list[Message]) -> float | None:
    """The norm the train messages asked the institutions to clip their updates to (client-side
    client-level DP; the wrapper sets one for all), or None when they were asked to clip nothing."""
    for message in messages:
        config = message.content.config_records.get(k.CONFIG)
        if config is not None and k.CLIPPING_NORM in config:
            return float(config[k.CLIPPING_NORM])
    return None


def _aggregate(round_: int, strategy: Strategy, inputs: RoundInputs, ledger: PrivacyLedger, arrays: ArrayRecord,
               trained: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
    """The new global arrays (unchanged when no one trained) and the training metrics. Declined
    clients sent no update. Under client-level DP the noised release happens even if none trained:
    skipping it would reveal that none did."""
    if not trained and inputs.cfg.dp.client_dp == "off":
        return arrays, None
    arrays, metrics = strategy.aggregate_train(round_, for_aggregation(trained))
    _refuse_non_finite(arrays, round_, inputs.cfg)
    release = state_dict(strategy).get("client_level")  # None without client-level DP
    if release is not None:
        ledger.record_client_level(release)
        # Client-level DP's second write: this noised release is on record before it is sent
        # anywhere (client evaluation sends it to the clients).
        ledger.save(inputs.run.path)
    return arrays, metrics


def _without_unidentified(registry: Registry, messages: list[Message], ledger: PrivacyLedger,
                          pins: dict[str, str], round_: int, console: Console) -> list[Message]:
    """Drop the train messages to nodes whose registered identity cannot be trusted (server/identity.py),
    recording each in the ledger under its registered name."""
    excluded = registry.exclusions(pins)
    kept = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in excluded:
            kept.append(message)
            continue
        ledger.record_exclusion(registry.names[node], round_, excluded[node])
        console.print(f"round {round_}: node {node} not asked to train: {excluded[node]}", markup=False,
                      highlight=False, soft_wrap=True)
    return kept


def _usable_evaluations(replies: list[Message], instructions: list[Message], round_: int,
                        console: Console) -> list[Message]:
    """The evaluate replies fit to average (server/validate.py::evaluation_problem), their example counts
    bounded as in training; each other one becomes a failure, which Flower's mean skips."""
    by_node = {m.metadata.dst_node_id: m for m in instructions}
    usable, failed = [], []
    for reply in replies:
        problem = None if reply.has_error() else evaluation_problem(reply)
        if problem:
            console.print(f"round {round_}: left out the evaluation from node {reply.metadata.src_node_id}: "
                          f"{problem}", markup=False, highlight=False, soft_wrap=True)
            reply = failed_reply(by_node[reply.metadata.src_node_id], f"evaluation rejected: {problem}")
        (failed if reply.has_error() else usable).append(reply)
    return bounded_weights(usable) + failed


def _refuse_misnamed(replies: list[Message], registry: Registry, instructions: list[Message]) -> list[Message]:
    """A reply whose stated client name is not its node's registered name becomes a failure."""
    by_node = {m.metadata.dst_node_id: m for m in instructions}
    out = []
    for reply in replies:
        reason = None if reply.has_error() else registry.misnamed(reply)
        out.append(failed_reply(by_node[reply.metadata.src_node_id], reason) if reason else reply)
    return out


def _refuse_non_finite(arrays: ArrayRecord, round_: int, cfg: FedtuneConfig) -> None:
    """A global adapter with NaN or Inf is never committed or sent: every later round would inherit it.
    Every update was finite (server/validate.py), so the strategy's own step produced it."""
    bad = [key for key in arrays.keys() if not np.isfinite(arrays[key].numpy()).all()]
    if bad:
        raise FedtuneError(f"Round {round_}: the aggregated adapter has NaN or Inf values in {', '.join(bad[:3])}, "
                           f"from the server's {cfg.strategy.name} step; nothing of this round was committed. Lower "
                           "strategy.server_learning_rate (or use fedavg), then resume the run.")


def _stop_here(inputs: RoundInputs, round_: int) -> None:
    if inputs.stop.is_set():
        raise RunStopped(round_)


def _require_quorum(round_: int, messages: list[Message], replies: list[Message], fraction: float) -> None:
    """Too few of the sampled clients answered for the round to stand for the federation (a worker
    killed for memory once left 18 rounds with 1 of 20 clients, and a worthless adapter): the round is
    not committed. What the replies that came report spending is already in the ledger."""
    answered = sum(not r.has_error() for r in replies)
    if messages and (answered == 0 or answered < fraction * len(messages)):
        reasons = "; ".join(sorted({r.error.reason.splitlines()[0][:160] for r in replies if r.has_error()})[:3])
        raise FedtuneError(f"Round {round_}: only {answered} of the {len(messages)} sampled clients answered "
                           f"(strategy.min_reply_fraction = {fraction:g}), so the round is not committed. Failures: "
                           f"{reasons or 'no replies'}. Fix the cause, then continue with --resume.")


def _stop_if_all_refused(round_: int, answered: list[Message]) -> None:
    """Every institution that answered refused the run's privacy settings (their own policies,
    privacy/policy.py): no later round can train either, so the run stops and says why."""
    refusals = [r.content[k.CLIENT_INFO] for r in answered
                if r.content[k.CLIENT_INFO][k.STATUS] == k.STATUS_REFUSED]
    if answered and len(refusals) == len(answered):
        reasons = "; ".join(f"{info[k.CLIENT_NAME]}: {info.get(k.REASON, 'no reason given')}" for info in refusals[:3])
        more = f" (and {len(refusals) - 3} more)" if len(refusals) > 3 else ""
        raise FedtuneError(f"Round {round_}: every institution refused to train under this run's privacy settings, "
                           f"so the run stops. {reasons}{more}. Each refusal is in the privacy ledger; change the "
                           "run's DP options, or the institutions' node config.")


def _round_row(round_: int, scores: Scores, train: Any, client_eval: Any,
               ledger: PrivacyLedger, trained: list[Message], replies: list[Message],
               bytes_down: int, train_s: float = 0.0, round_s: float = 0.0) -> dict[str, Any]:
    return {
        "round": round_,
        **scores.row(),  # eval_accuracy, eval_loss (and eval_perplexity for a causal LM)
        "train_loss": float(train[k.TRAIN_LOSS]) if train else None,
        "client_eval_accuracy": float(client_eval[k.EVAL_ACCURACY]) if client_eval else None,
        "client_eval_loss": float(client_eval[k.EVAL_LOSS]) if client_eval else None,
        "epsilon_max": ledger.epsilon_max(),
        "num_clients": len(trained),
        "num_failed": sum(r.has_error() for r in replies) + _count_status(replies, k.STATUS_FAILED),
        "num_declined": _count_status(replies, k.STATUS_DECLINED),
        "num_refused": _count_status(replies, k.STATUS_REFUSED),
        # per client (mean over those that trained); optional, so absent from the mean when one reply lacks it
        "bytes_up": int(train.get(k.BYTES_UP, 0)) if train else 0,
        "bytes_down": int(bytes_down),  # per client
        "train_examples": sum(int(r.content[k.METRICS][k.NUM_EXAMPLES]) for r in trained),
        "train_s": round(train_s, 3),  # configure, train on every sampled client, aggregate
        "round_s": round(round_s, 3),  # the same plus client and server evaluation
    }


def _count_status(replies: list[Message], status: str) -> int:
    return sum(not r.has_error() and r.content[k.CLIENT_INFO][k.STATUS] == status for r in replies)


def _round_line(row: dict[str, Any], rounds: int) -> str:
    eps = "off" if row["epsilon_max"] is None else f"{row['epsilon_max']:.2f}"
    ppl = f"ppl={row['eval_perplexity']:.2f}  " if "eval_perplexity" in row else ""
    return (f"round {row['round']}/{rounds}  acc={row['eval_accuracy']:.3f}  "
            f"loss={row['eval_loss']:.3f}  {ppl}train_loss={_fmt(row['train_loss'])}  "
            f"eps_max={eps}  clients={row['num_clients']}  {_not_trained(row, '  ')}up={row['bytes_up'] / 1e6:.2f}MB  "
            f"{row['round_s']:.0f}s")


def _not_trained(row: dict[str, Any], end: str = "") -> str:
    """The sampled clients that did not train, by why (`declined=2 failed=1`), or "" when all trained."""
    counts = [f"{why}={row[f'num_{why}']}" for why in ("declined", "refused", "failed") if row.get(f"num_{why}")]
    return " ".join(counts) + end if counts else ""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"  # NaN: withheld (release-scores)
