"""The round loop: send, collect, aggregate, evaluate, commit.

Flower's Strategy.start() runs rounds too, but it cannot resume from a checkpoint and has no
per-round hook for committing state or showing progress. This loop calls the same four
strategy hooks (configure/aggregate train and evaluate) in the same order, so any Flower
strategy or strategy wrapper plugs in unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.errors import FedtuneError
from fedtune.privacy.accountant import other
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.evaluate import ServerEvaluator
from fedtune.server.run_dir import Checkpoint, RunDirectory

PULL_INTERVAL_S = 0.1


@dataclass
class RoundInputs:
    """What the loop needs besides the strategy: config, run directory, evaluator, console."""

    cfg: FedtuneConfig
    run: RunDirectory
    evaluate: ServerEvaluator
    console: Console = field(default_factory=Console)
    timeout_s: float | None = None


def exchange(grid: Grid, messages: Iterable[Message], label: str, progress: Progress,
             timeout_s: float | None) -> list[Message]:
    """Push `messages`, then pull replies until all are back (or the timeout), with a bar."""
    pending = set(grid.push_messages(list(messages)))
    task = progress.add_task(label, total=len(pending))
    replies: list[Message] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending and (deadline is None or time.monotonic() < deadline):
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        progress.update(task, completed=len(replies))
        if pending:
            time.sleep(PULL_INTERVAL_S)
    progress.remove_task(task)
    return replies


def record_privacy(ledger: PrivacyLedger, round_: int, replies: list[Message],
                   node_names: dict[int, str]) -> None:
    """One ledger entry per client that answered (trained) or failed this round."""
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            ledger.record(node_names.get(node, f"node-{node}"),
                          {"round": round_, "status": k.STATUS_FAILED, "reason": reply.error.reason})
            continue
        name = str(reply.content[k.CLIENT_INFO][k.CLIENT_NAME])
        node_names[node] = name
        m = reply.content[k.METRICS]
        ledger.record(name, {
            "round": round_, "status": str(reply.content[k.CLIENT_INFO][k.STATUS]),
            "noise_multiplier": float(m[k.NOISE_MULTIPLIER]), "max_grad_norm": float(m[k.MAX_GRAD_NORM]),
            "sample_rate": float(m[k.SAMPLE_RATE]), "steps": int(m[k.STEPS]), "delta": float(m[k.DELTA]),
            "epsilon": float(m[k.EPSILON]), f"epsilon_{other(ledger.accountant)}": float(m[k.EPSILON_OTHER]),
        })


def initial_checkpoint(inputs: RoundInputs, arrays: ArrayRecord) -> Checkpoint:
    """Round 0: the initial adapter and its server-side evaluation, before any training."""
    loss, accuracy = inputs.evaluate(arrays)
    ledger = PrivacyLedger(inputs.cfg.dp.accountant, inputs.cfg.dp.enabled)
    row = _round_row(0, loss, accuracy, None, None, ledger, [], [], bytes_down=0)
    return Checkpoint(0, dict(arrays.to_torch_state_dict()), [row], ledger.to_dict(), {})


def run_rounds(grid: Grid, strategy: Strategy, inputs: RoundInputs, start: Checkpoint) -> Checkpoint:
    """Run rounds start.round+1 .. cfg.rounds, committing each; returns the last checkpoint."""
    cfg, state = inputs.cfg, start
    arrays = ArrayRecord(torch_state_dict=start.arrays)
    ledger = PrivacyLedger.from_dict(start.ledger)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=inputs.console, transient=True) as progress:
        for round_ in range(start.round + 1, cfg.rounds + 1):
            config = ConfigRecord({**cfg.to_flat(), k.CLIENT_STATE_DIR: str(inputs.run.client_state_dir.resolve())})
            messages = strategy.configure_train(round_, arrays, config, grid)
            replies = exchange(grid, messages, f"round {round_}/{cfg.rounds} train", progress, inputs.timeout_s)
            record_privacy(ledger, round_, replies, state.node_names)
            answered = [r for r in replies if not r.has_error()]
            if not answered:
                reasons = "; ".join(r.error.reason for r in replies[:3]) or "no replies"
                raise FedtuneError(f"Round {round_}: no client answered ({reasons}).")
            trained = [r for r in answered if r.content[k.CLIENT_INFO][k.STATUS] == k.STATUS_TRAINED]
            bytes_down = arrays.count_bytes()
            train_metrics = None
            if trained:  # declined clients sent no update; the others are aggregated
                arrays, train_metrics = strategy.aggregate_train(round_, trained)
            eval_config = ConfigRecord(dict(config))
            eval_replies = exchange(grid, strategy.configure_evaluate(round_, arrays, eval_config, grid),
                                    f"round {round_}/{cfg.rounds} evaluate", progress, inputs.timeout_s)
            client_eval = strategy.aggregate_evaluate(round_, eval_replies)
            loss, accuracy = inputs.evaluate(arrays)
            row = _round_row(round_, loss, accuracy, train_metrics, client_eval, ledger, trained, replies,
                             bytes_down)
            state = Checkpoint(round_, dict(arrays.to_torch_state_dict()), [*state.metrics, row],
                               ledger.to_dict(), state.node_names)
            inputs.run.commit(state)
            inputs.console.print(_round_line(row, cfg.rounds), soft_wrap=True)
    return state


def _round_row(round_: int, loss: float, accuracy: float, train: Any, client_eval: Any,
               ledger: PrivacyLedger, trained: list[Message], replies: list[Message],
               bytes_down: int) -> dict[str, Any]:
    return {
        "round": round_,
        "eval_accuracy": accuracy,
        "eval_loss": loss,
        "train_loss": float(train[k.TRAIN_LOSS]) if train else None,
        "client_eval_accuracy": float(client_eval[k.EVAL_ACCURACY]) if client_eval else None,
        "client_eval_loss": float(client_eval[k.EVAL_LOSS]) if client_eval else None,
        "epsilon_max": ledger.epsilon_max(),
        "num_clients": len(trained),
        "num_failed": sum(r.has_error() for r in replies),
        "num_declined": sum(not r.has_error() for r in replies) - len(trained),
        "bytes_up": int(train[k.BYTES_UP]) if train else 0,  # per client (mean over those that trained)
        "bytes_down": int(bytes_down),  # per client
    }


def _round_line(row: dict[str, Any], rounds: int) -> str:
    eps = "off" if row["epsilon_max"] is None else f"{row['epsilon_max']:.2f}"
    return (f"round {row['round']}/{rounds}  acc={row['eval_accuracy']:.3f}  "
            f"loss={row['eval_loss']:.3f}  train_loss={_fmt(row['train_loss'])}  "
            f"eps_max={eps}  clients={row['num_clients']}  up={row['bytes_up'] / 1e6:.2f}MB")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
