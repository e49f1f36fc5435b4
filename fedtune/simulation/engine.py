"""Run a federation on Flower's Simulation Engine (Ray backend). No algorithm code here:
this module only checks that the federation can start, sizes the backend and starts it."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from rich.console import Console

from fedtune.config import FedtuneConfig, SimulationConfig
from fedtune.errors import ClusterUnreachable, ConfigError
from fedtune.server.run_dir import RunDirectory
from fedtune.simulation.shared_paths import check_nodes_see_run


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's cpuset), not the
    machine's count, so a simulation confined to some cores starts only as many workers as fit them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def backend_config(cfg: FedtuneConfig) -> dict:
    """Flower's Ray backend settings. On a local Ray, sized to this process's CPUs; on an existing
    cluster (simulation.ray_address), Flower sizes the worker pool from the cluster's nodes
    (pool_size_from_resources), so a client asks for num_cpus_per_client as it stands."""
    address = cfg.simulation.ray_address
    cpus = usable_cpus()
    init = ({"address": address} if address else {"num_cpus": cpus}) | {"logging_level": "ERROR", "log_to_driver": True}
    # Locally, no more workers than the CPUs or a round's clients, whichever is more: each loads the model,
    # and a tiny fraction (0.001) would start thousands of them on two cores.
    local = max(min(cfg.num_cpus_per_client, cpus), cpus / max(cpus, cfg.clients_sampled()))
    return {
        "client_resources": {"num_cpus": cfg.num_cpus_per_client if address else local,
                             "num_gpus": 1.0 if cfg.model.device == "cuda" else 0.0,
                             # Flower passes these to the worker actors' Ray options: a worker that dies
                             # (killed for memory, say) is restarted, so later rounds have their clients
                             # again; the message it held fails, and the round's quorum check counts it.
                             "max_restarts": -1},
        # What start_local_ray passes to ray.init (connect_cluster joins with the address); Flower's
        # backend finds Ray running and starts none. No runtime_env here (start_local_ray says why).
        "init_args": init,
    }


def simulation_workers(cfg: FedtuneConfig) -> int:
    """How many worker processes the Ray backend starts for backend_config(cfg): as many as fit the
    CPUs, and with cuda one per GPU (Flower's pool_size_from_resources, on this one machine; on an
    existing cluster, Flower's own count over its nodes, with Ray already connected)."""
    resources = backend_config(cfg)["client_resources"]
    if cfg.simulation.ray_address:
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        return pool_size_from_resources(resources)
    workers = int(usable_cpus() / resources["num_cpus"])
    if resources["num_gpus"]:
        import torch

        workers = min(workers, torch.cuda.device_count())
    return max(workers, 1)


def require_ray_token() -> None:
    """Make the Ray that the simulation starts refuse every caller without this process's token.

    Ray's servers (GCS, raylets, workers) listen on every interface, and Ray 2.55 has no option to
    bind them to loopback; anyone who could reach a port could submit work to the cluster, and read
    what the clients hold. Ray's token authentication (RAY_AUTH_MODE=token) makes each of them
    refuse a call without the token. The token is random, made once per process (Ray's loader
    caches the first one it reads, so a second simulation in this process must use the same), and
    lives only in the environment of this process and of the workers Ray starts from it. A user's
    own Ray authentication settings are left as they are."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = _process_token()


@lru_cache(maxsize=1)
def _process_token() -> str:
    return secrets.token_hex(32)


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
    # When this process is killed (SIGKILL, the OOM killer), Ray's GCS and raylet die with it, but its
    # DashboardAgent and RuntimeEnvAgent first try to report the raylet's death to the dead GCS and
    # wait out the GCS reconnect timeout, 60 s by default. On this one machine the GCS lives and dies
    # with this process, so waiting for it to come back is pointless; 10 s lets them exit soon after.
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "10")
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.server.app import server_app

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    notice_filter = _DropDeprecationNotice()
    flwr_logger.addFilter(notice_filter)
    stop, done = threading.Event(), threading.Event()
    started_ray = False
    try:
        with _first_ctrl_c_stops(stop, console):
            if cfg.simulation.ray_address:
                connect_cluster(cfg, console)
                started_ray = True
                checked = check_nodes_see_run(cfg, run)
                console.print(f"Each of the {checked} nodes sees this run directory"
                              + (" and data.path" if cfg.data.source == "file" else "") + " as this machine does.",
                              markup=False, highlight=False)
            else:
                require_ray_token()
                started_ray = start_local_ray(cfg)
            if stop.is_set():  # Ctrl-C while Ray was starting: no round has run
                raise KeyboardInterrupt
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
        if started_ray:
            _leave_ray()


def _leave_ray() -> None:
    """Flower's backend shuts Ray down when the simulation ends; this covers a failure before it
    started, so no Ray started (or joined) here outlives the run."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


PRELOADED = "fedtune.client.app"  # what a worker needs for its first client: torch, transformers, peft, Opacus


def start_local_ray(cfg: FedtuneConfig) -> bool:
    """Start the local Ray for the simulation here, not in Flower's backend (whose init_ray then
    skips it), so that round 1 waits less for the workers' start-up:
    - Ray starts one idle worker per CPU as it starts. Each imports PRELOADED at once (Ray's
      `preload_python_modules` setting), while Ray finishes starting and the server loads its
      evaluator, instead of when its first message arrives (ray_system_config says when).
    - No job-level runtime_env: Flower passes one holding PYTHONPATH, and Ray gives an actor a worker
      started with the actor's runtime_env, so every worker started idle would be left idle and new
      ones started. The idle workers inherit PYTHONPATH from this process's environment instead,
      as Flower's own init sets it (this Ray runs on this machine only).
    Ray sets a worker's OMP_NUM_THREADS only when its actor starts, after the preloaded torch has
    sized its thread pool; the client app resizes it (client/app.py::threads_as_assigned).
    `address="local"`: a new Ray on this machine, whatever RAY_ADDRESS or an earlier `ray start`
    says (an existing cluster is joined only through simulation.ray_address). Returns whether it
    started one (a Ray already running in this process, a caller's, is used as it is)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ["PYTHONPATH"] = _worker_pythonpath()
    ray.init(address="local", **backend_config(cfg)["init_args"], include_dashboard=False,
             _system_config=ray_system_config(cfg))
    return True


def ray_system_config(cfg: FedtuneConfig) -> dict:
    """Preload the ClientApp only where each of the idle workers Ray starts (one per CPU) becomes one
    of Flower's, on CPU: with more CPUs per client the rest would import torch for nothing, beside
    the workers that train; with cuda, one worker per GPU, and the imports would run before Ray
    sets the worker's CUDA_VISIBLE_DEVICES."""
    every_idle_worker_trains = cfg.model.device == "cpu" and simulation_workers(cfg) >= usable_cpus()
    return {"preload_python_modules": [PRELOADED]} if every_idle_worker_trains else {}


def _worker_pythonpath() -> str:
    """This process's import path, for the workers (Flower's backend passes the same)."""
    return os.pathsep.join(filter(None, [os.pathsep.join(sys.path), os.environ.get("PYTHONPATH")]))


def connect_cluster(cfg: FedtuneConfig, console: Console) -> None:
    """Join the Ray cluster at simulation.ray_address as its driver, as Flower's backend would (its
    init_ray skips a Ray already connected): worker processes get this process's import path, so
    every node must have this Python environment at the same path. The cluster's own security
    settings (e.g. RAY_AUTH_MODE=token with the cluster's RAY_AUTH_TOKEN) are the user's; fedtune's
    random per-process token is for the Ray it starts itself."""
    import ray

    pythonpath = os.environ["PYTHONPATH"] = _worker_pythonpath()
    check_cluster(cfg.simulation.ray_address)
    try:
        ray.init(address=cfg.simulation.ray_address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 logging_level="ERROR", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterUnreachable(f"Could not join the Ray cluster at simulation.ray_address = "
                          f"{cfg.simulation.ray_address!r} ({_first_line(err)}). Start it with `ray start --head` "
                          "and give the address it printed, or leave the option empty for a local Ray.") from err
    nodes = [node for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU")]
    console.print(f"Ray cluster at {cfg.simulation.ray_address}: {len(nodes)} nodes with CPUs, "
                  f"{simulation_workers(cfg)} client workers.", markup=False, highlight=False)


def check_cluster(address: str) -> None:
    """Refuse a Ray head address (HOST:PORT) that accepts no TCP connection, before a run directory is
    written: Ray's core, finding no cluster there, ends the whole process after a 10 s wait instead
    of raising. `auto` is looked up as Ray looks it up (RAY_ADDRESS, else the last `ray start`'s address,
    which may be a cluster long gone), then checked the same way. Empty (a local Ray) passes."""
    if not address:
        return
    SimulationConfig(ray_address=address)  # its form first (HOST:PORT), with the option's own message
    if address == "auto":
        address = _auto_address()
        if address is None:
            return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as err:  # refused, timed out, unknown host
        raise ConfigError(f"Could not join the Ray cluster at simulation.ray_address = {address!r} ({err}). Start "
                          "it with `ray start --head` and give the address it printed, or leave the option empty "
                          "for a local Ray.") from err


def _auto_address() -> str | None:
    """The HOST:PORT `ray.init(address="auto")` would join, or None when this Ray cannot say (then Ray
    itself decides). Ray's own lookup, from its private module: no public function gives it."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as err:  # no cluster recorded or running
        raise ConfigError(f"Could not find a Ray cluster for simulation.ray_address = 'auto' ({_first_line(err)}). "
                          "Start one with `ray start --head`, or give its HOST:PORT, or leave the option empty for "
                          "a local Ray.") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


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
