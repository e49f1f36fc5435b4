"""Simulation only: start every Ray worker's one-time loading while the server prepares round 0.

A Simulation Engine worker imports torch, transformers, peft and Opacus and loads the base model
when its first client arrives, so round 1 would also pay that start-up. Flower 1.42 offers no
worker set-up hook that fedtune can use (its Ray backend passes its own `runtime_env` to
`ray.init`), so the server sends one `query.warm_up` message per worker before it loads its own
evaluator, and waits for the replies only just before round 1. The workers load in parallel
with the server's set-up and round-0 evaluation; what is left is reported as `warm_up_wait_s`.
"""

from __future__ import annotations

import threading
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import constants as k
from fedtune.config import FedtuneConfig

POLL_S = 0.05
NODES_TIMEOUT_S = 10.0


def start_warm_up(grid: Grid, cfg: FedtuneConfig, workers: int) -> set[str]:
    """Push one warm-up message to each of `workers` nodes; returns the ids of those sent. With
    every worker idle, each message goes to a different one."""
    wanted, deadline = min(workers, cfg.clients), time.monotonic() + NODES_TIMEOUT_S
    while len(nodes := grid.get_node_ids()) < wanted and time.monotonic() < deadline:
        time.sleep(POLL_S)  # the simulated SuperNodes register as the ServerApp starts
    nodes = sorted(nodes)[:workers]
    messages = [Message(RecordDict({k.CONFIG: ConfigRecord(cfg.client_flat())}), dst_node_id=node,
                        message_type=k.WARM_UP) for node in nodes]
    return set(filter(None, grid.push_messages(messages)))


def finish_warm_up(grid: Grid, sent: set[str], timeout_s: float,
                   stop: threading.Event | None = None) -> tuple[float, int]:
    """Wait for the warm-up replies (at most timeout_s); returns the seconds waited and how many
    warm-ups failed (an error reply, or none in time). A failure does not stop the run: the same
    cause reaches round 1, which reports it per client."""
    started = time.monotonic()
    pending, failed = set(sent), 0
    while pending and time.monotonic() - started < timeout_s and not (stop and stop.is_set()):
        replies = grid.pull_messages(pending)
        pending -= {m.metadata.reply_to_message_id for m in replies}
        failed += sum(m.has_error() for m in replies)
        if pending:
            time.sleep(POLL_S)
    return time.monotonic() - started, failed + len(pending)
