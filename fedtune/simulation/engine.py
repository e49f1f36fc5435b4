"""Run a federation on Flower's Simulation Engine (Ray backend). No algorithm code here:
this module only checks that the federation can start, sizes the backend and starts it."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

from fedtune.config import FedtuneConfig
from fedtune.data.chat import chat_summary
from fedtune.data.federated import federated_data
from fedtune.data.instruct import federated_instructions
from fedtune.data.summary import partition_summary
from fedtune.data.text import token_counts
from fedtune.errors import ConfigError
from fedtune.models.build import check_model, load_tokenizer
from fedtune.server.run_dir import RunDirectory


def preflight(cfg: FedtuneConfig) -> None:
    """Everything that can be checked before a run directory is made; raises FedtuneError."""
    # causal-lm: converts the default model on first use
    check_model(cfg.model.name_or_path, cfg.model.task, cfg.model.pooling)
    federated = federated_instructions if cfg.model.task == "causal-lm" else federated_data
    fed = federated(cfg.data, cfg.clients, cfg.seed)  # raises DataError on unusable splits
    if cfg.dp.enabled:
        largest = max(len(split.train) for split in fed.clients)
        if cfg.dp.delta >= 1.0 / largest:
            raise ConfigError(f"Invalid option `dp.delta`: {cfg.dp.delta} is not below 1/n for a client "
                              f"with n={largest} records, so the guarantee would be meaningless. Set it "
                              f"to {1.0 / (10 * largest):.1e} or smaller.")
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("Invalid option `model.device`: cuda was asked for but no GPU is visible. "
                              "Set it to `cpu`.")


def data_summary(cfg: FedtuneConfig) -> dict:
    """Examples and labels per client, and texts longer than model.max_length (after preflight)."""
    if cfg.model.task == "causal-lm":
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.task)
        return chat_summary(federated_instructions(cfg.data, cfg.clients, cfg.seed), cfg.data, tokenizer,
                            cfg.model.max_length)
    fed = federated_data(cfg.data, cfg.clients, cfg.seed)
    lengths = token_counts(load_tokenizer(cfg.model.name_or_path), fed.texts, cfg.model.max_length)
    return partition_summary(fed, cfg.data, lengths, cfg.model.max_length)


def backend_config(cfg: FedtuneConfig) -> dict:
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": min(cfg.num_cpus_per_client, cpus),
                             "num_gpus": 1.0 if cfg.model.device == "cuda" else 0.0},
        # No runtime_env here: Flower's RayBackend passes its own to ray.init, and a second one
        # fails the start ("multiple values for keyword argument 'runtime_env'").
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": True},
    }


def simulation_workers(cfg: FedtuneConfig) -> int:
    """How many worker processes the Ray backend starts for backend_config(cfg): as many as fit the
    CPUs, and with cuda one per GPU (Flower's pool_size_from_resources, on this one machine)."""
    resources = backend_config(cfg)["client_resources"]
    workers = int((os.cpu_count() or 1) / resources["num_cpus"])
    if resources["num_gpus"]:
        import torch

        workers = min(workers, torch.cuda.device_count())
    return max(workers, 1)


class _DropDeprecationNotice(logging.Filter):
    # Flower marks its Python simulation entry point deprecated in favour of `flwr run`; fedtune
    # offers both, so the notice would only confuse a `fedtune simulate` user.
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


STOP_WAIT_S = 60.0  # after a second Ctrl-C: the most the server thread gets to record what arrived and return


def simulate(cfg: FedtuneConfig, run: RunDirectory, console: Console) -> None:
    """Start the ServerApp and `cfg.clients` virtual SuperNodes running the ClientApp.

    Ctrl-C stops the whole run. Flower's Simulation Engine runs the ServerApp in a thread of its own;
    an interrupt in the main thread would shut Ray down under it and leave that thread running its
    rounds (each client then failing after round_timeout_s). Instead the first Ctrl-C only sets
    `stop`, which the round loop checks at every poll: the ServerApp returns, and Flower then ends
    the simulation and shuts Ray down in its usual order, within seconds. A second Ctrl-C interrupts
    the main thread, for a ServerApp that does not return."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.server.app import server_app

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    notice_filter = _DropDeprecationNotice()
    flwr_logger.addFilter(notice_filter)
    stop, done = threading.Event(), threading.Event()
    try:
        with _first_ctrl_c_stops(stop, console):
            server = server_app(cfg, run, console, warm_workers=simulation_workers(cfg), stop=stop, done=done)
            try:
                run_simulation(server_app=server, client_app=client_app, num_supernodes=cfg.clients,
                               backend_config=backend_config(cfg))
            except KeyboardInterrupt:
                stop.set()
                done.wait(STOP_WAIT_S)  # Flower has already shut Ray down
                raise
            if stop.is_set():  # stopped by Ctrl-C: the ServerApp said where, the caller says how to go on
                raise KeyboardInterrupt
    finally:
        flwr_logger.removeFilter(notice_filter)


@contextmanager
def _first_ctrl_c_stops(stop: threading.Event, console: Console) -> Iterator[None]:
    """The first SIGINT sets `stop`; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (tests may call from another)
        return

    def on_sigint(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        console.print("Stopping: the round in progress is not committed (Ctrl-C again to force).")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
