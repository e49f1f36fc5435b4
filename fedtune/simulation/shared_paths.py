"""Before round 1 on a Ray cluster: does every node see the run directory and the data as the driver does?

A client may run on any node, and a later round of the same client on another. Each reads its
partition from data.path and keeps the ε it has spent in RUN_DIR/client_state/, so both must be the
same files on every node (a shared file system mounted at the same path). A node with a copy of
its own would train on other records, or hold a state older than the server's ledger, after which
its clients refuse to train (client/state.py) and the run stalls mid-way. This check finds it before
anything is spent: one task pinned to each node reads a random token the driver has just written
into client_state/, writes its own answer beside it (which the driver must then read back, so the
node's writes reach the driver too), and hashes data.path.

Written here because Ray has no such check: its runtime_env can ship a working directory to every
node, but fedtune's state must be one set of files that every node writes, not a copy per node.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.server.run_dir import RunDirectory

PROBE = ".node-probe"  # the driver's token, in client_state/; each node answers in PROBE-<node id>
NODE_TIMEOUT_S = 120  # plus the time to hash data.path at HASH_BYTES_PER_S (a network file system's pace)
HASH_BYTES_PER_S = 25e6


def data_digest(path: str) -> str | None:
    """SHA-256 of the file at `path`, or of a directory's relative file names and contents; None when
    nothing is there (a hub id: each node downloads it itself)."""
    found = Path(path)
    if found.is_file():
        files = [found]
    elif found.is_dir():
        files = sorted(p for p in found.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(found) if file != found else "").encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def what_node_sees(state_dir: str, token: str, node: str, data_path: str, expected_digest: str | None) -> list[str]:
    """Run on one node: what differs there from the driver's view (empty when nothing does)."""
    problems = []
    probe = Path(state_dir) / PROBE
    try:
        if probe.read_text() != token:
            problems.append(f"{state_dir} is another copy: the token the driver just wrote is not there")
        else:
            (Path(state_dir) / f"{PROBE}-{node}").write_text(token)
    except OSError as err:
        problems.append(f"cannot use the run directory's {state_dir} ({err.strerror or err})")
    if expected_digest is not None:
        there = data_digest(data_path) if os.path.exists(data_path) else None
        if there is None:
            problems.append(f"data.path {data_path!r} is not there")
        elif there != expected_digest:
            problems.append(f"data.path {data_path!r} holds other data than the driver's (SHA-256 differs)")
    return problems


def check_nodes_see_run(cfg: FedtuneConfig, run: RunDirectory) -> int:
    """Refuse to start when a node with CPUs does not see client_state/ (read and written) or data.path as
    the driver does; returns the number of nodes checked. Needs a connected Ray."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    state_dir = run.client_state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    (state_dir / PROBE).write_text(token)
    digest = data_digest(cfg.data.path) if cfg.data.source == "file" else None
    nodes = {node["NodeID"]: node.get("NodeManagerAddress", node["NodeID"]) for node in ray.nodes()
             if node.get("Alive") and node.get("Resources", {}).get("CPU")}
    task = ray.remote(num_cpus=0, max_retries=0)(what_node_sees)
    timeout = NODE_TIMEOUT_S + (_bytes(cfg.data.path) / HASH_BYTES_PER_S if digest else 0.0)
    try:
        pending = {
            node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(state_dir), token, node, cfg.data.path, digest)
            for node in nodes}
        problems = []
        for node, ref in pending.items():
            try:
                found = ray.get(ref, timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                found = [f"the check did not finish within {timeout:.0f} s (it reads client_state/ and hashes "
                         "data.path there)"]
            except ray.exceptions.RayError as err:
                found = [f"the check did not run there ({type(err).__name__})"]
            if not found and _read(state_dir / f"{PROBE}-{node}") != token:
                found = [f"what it writes into {state_dir} does not reach this machine"]
            problems += [f"node {nodes[node]}: {problem}" for problem in found]
    finally:
        for probe in state_dir.glob(f"{PROBE}*"):
            probe.unlink(missing_ok=True)
    if problems:
        raise ConfigError("Not every Ray node sees this run as the driver does, so clients would train on other "
                          "data or lose the ε they spent:\n  " + "\n  ".join(problems) + "\nPut the run directory "
                          "(--out) and data.path on a file system every node mounts at the same path, with "
                          "absolute paths (docs/simulation.md); nothing was spent, so then "
                          f"{run.how_to_continue()} --ray-address {cfg.simulation.ray_address}.")
    return len(nodes)


def _bytes(path: str) -> int:
    found = Path(path)
    return found.stat().st_size if found.is_file() else sum(p.stat().st_size for p in found.rglob("*") if p.is_file())


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
