"""`fedtune simulate --ray-address` on a Ray cluster that someone else started: a head node and a
second node, both on loopback with 1 CPU each, so the clients really run in two raylets. The test
starts both with `ray start --block` and stops them by the process groups it started, never with
`ray stop` (which would stop every Ray on the machine, other tests' included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.test_simulate import fedtune_here

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`ray start ... --block`: it stays in the foreground, and stopping its process group stops every
    process it started."""
    return subprocess.Popen([RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             "--disable-usage-stats", "--block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def nodes_alive(address: str, env: dict[str, str]) -> int:
    result = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True,
                            timeout=60)
    return result.stdout.count(" node_") if result.returncode == 0 else 0


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def two_node_cluster():
    """(the head's address, the environment to reach it): two raylets on this machine."""
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    env["RAY_TMPDIR"] = temp
    address = f"127.0.0.1:{free_port()}"
    started = [ray_start(["--head", "--port", address.split(":")[1], "--include-dashboard", "false"], env)]
    try:
        deadline = time.monotonic() + 60
        while nodes_alive(address, env) < 1:
            assert time.monotonic() < deadline, "the head node did not start"
            time.sleep(1)
        started.append(ray_start(["--address", address], env))
        while nodes_alive(address, env) < 2:
            assert time.monotonic() < deadline + 60, "the second node did not join"
            time.sleep(1)
        yield address, env
    finally:
        for process in reversed(started):
            stop(process)


def test_simulate_runs_on_an_existing_cluster_with_clients_on_both_nodes(tmp_path, two_node_cluster):
    address, env = two_node_cluster
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", "--ray-address", address,
                             "--clients", "6", "--rounds", "1", "--examples", "120", "--no-dp",
                             "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Ray cluster at {address}: 2 nodes with CPUs, 2 client workers" in result.stderr
    assert "Each of the 2 nodes sees this run directory as this machine does" in result.stderr
    assert not list((out / "client_state").glob(".node-probe*")), "the check leaves nothing behind"
    placed = json.loads((out / "summary.json").read_text())["train_replies_per_ray_node"]
    assert len(placed) == 2 and sum(placed.values()) == 6, placed  # every client, on both nodes
    assert "Training replies per Ray node" in result.stderr
    assert nodes_alive(address, env) == 2, "the run disconnects and leaves the user's cluster running"
    # Where a run's clients train may change when it is continued (nothing else but --rounds may).
    code, _, stderr = fedtune_here("simulate", "--resume", str(out), "--ray-address", address)
    assert code == 0 and "nothing to resume" in stderr, stderr[-2000:]
    assert f'ray_address = "{address}"' in (out / "config.toml").read_text()


def test_a_cluster_that_is_not_there_is_a_clear_error(tmp_path):
    """Ray itself, finding no cluster at the address, ends the process after 10 s without a word."""
    code, _, stderr = fedtune_here("simulate", "--ray-address", f"127.0.0.1:{free_port()}", "--clients", "2",
                                   "--rounds", "1", "--out", str(tmp_path / "run"))
    assert code == 2, stderr[-3000:]
    assert "Could not join the Ray cluster" in stderr and "ray start --head" in stderr
    assert not (tmp_path / "run").exists(), "refused before anything is written"
