"""The Ray behind `fedtune simulate` (simulation/engine.py), checked on a real cluster in a child
process, as `fedtune simulate` starts it:
- it refuses callers without the run's token. Ray's servers listen on every interface; without
  authentication anyone who reaches a port could join. Two callers try: one without the token and
  one with it (so a refusal is the token's doing, not the network's);
- a worker that dies is restarted with the options fedtune gives Flower's worker actors, so later
  rounds have their clients again (a run once went on for 18 rounds with 1 of 20 clients);
- a worker actor lands on a worker that Ray started idle with Ray itself, which has already
  imported the client app (start_local_ray), and runs torch on the one thread it was given."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CLUSTER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    if len(os.sched_getaffinity(0)) < 2 <= (os.cpu_count() or 1):  # pytest-xdist pins each worker to a core
        os.sched_setaffinity(0, sorted(range(os.cpu_count()))[:2])  # two, as a laptop's smallest
    print("cores", len(os.sched_getaffinity(0)))
    from fedtune.config import FedtuneConfig
    from fedtune.simulation.engine import PRELOADED, backend_config, require_ray_token, start_local_ray, usable_cpus
    require_ray_token()
    import ray
    start_local_ray(FedtuneConfig())
    caller = ("import ray\\ntry:\\n ray.init(address=%r, logging_level='ERROR'); print('JOINED')\\n"
              "except Exception as err: print('REFUSED', type(err).__name__)") % ray.get_runtime_context().gcs_address
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base["RAY_py_gcs_connect_timeout_s"] = "5"
    # The holder gets time to join a loaded cluster; the outsider, without the token, must not join at all.
    for label, env in (("outsider", base), ("holder", dict(os.environ, RAY_py_gcs_connect_timeout_s="60"))):
        out = subprocess.run([sys.executable, "-c", caller], env=env, capture_output=True, text=True, timeout=120)
        print(label, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "nothing")

    def idle_workers():  # this process's descendants that Ray titled as idle workers
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass
        def ours(pid):
            while pid > 1:
                pid = parent.get(pid, 1)
                if pid == os.getpid():
                    return True
            return False
        return {pid for pid in parent if ours(pid) and open(f"/proc/{pid}/cmdline").read().startswith("ray::IDLE")}

    for _ in range(600):  # up to 5 minutes: each imports torch and the client app, slowly beside other tests
        # (a CI run beside a deployment test took over 3 minutes once)
        if len(idle := idle_workers()) >= usable_cpus():  # Ray starts one per CPU
            break
        time.sleep(0.5)

    @ray.remote
    class Worker:
        def __init__(self):
            self.preloaded = PRELOADED in sys.modules  # before this actor imports anything of fedtune

        def pid(self):
            return os.getpid()

        def threads(self):
            import torch
            from fedtune.client.app import threads_as_assigned
            before = torch.get_num_threads()  # sized when the preload imported torch
            threads_as_assigned()
            return (self.preloaded, before, torch.get_num_threads())

    worker = Worker.options(**backend_config(FedtuneConfig())["client_resources"]).remote()
    first = ray.get(worker.pid.remote())
    print("placed", first in idle, "of", sorted(idle))
    print("preloaded_threads", *ray.get(worker.threads.remote()))
    os.kill(first, signal.SIGKILL)  # as the OOM killer does
    for _ in range(120):
        try:
            print("restarted", ray.get(worker.pid.remote()) != first)
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.5)
    else:
        print("restarted never")
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", CLUSTER], env=env, capture_output=True, text=True, timeout=720)
    said = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                if line.startswith(("outsider", "holder", "restarted", "placed", "preloaded_threads", "cores")))
    return {**said, "log": out.stdout + out.stderr[-2000:]}


def test_a_caller_without_the_token_cannot_join_the_simulations_ray(cluster):
    assert (cluster.get("outsider"), cluster.get("holder")) == ("REFUSED ConnectionError", "JOINED"), cluster["log"]


def test_a_killed_worker_is_replaced(cluster):
    assert cluster.get("restarted") == "True", cluster["log"]


def test_a_worker_actor_reuses_a_worker_started_with_ray_that_has_imported_the_client_app(cluster):
    assert cluster.get("placed", "").startswith("True"), cluster["log"]
    preloaded, before, after = cluster.get("preloaded_threads", "? ? ?").split()
    assert (preloaded, after) == ("True", "1"), cluster["log"]
    if cluster.get("cores") == "2":  # torch sized its pool to both cores before the actor was given one
        assert before == "2", cluster["log"]


FAILS_BEFORE_FLOWER = textwrap.dedent("""
    import tempfile
    from pathlib import Path
    from rich.console import Console
    import fedtune.server.app
    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import RunDirectory
    from fedtune.simulation.engine import simulate

    def broken(*args, **kwargs):
        raise RuntimeError("server app could not be built")

    fedtune.server.app.server_app = broken
    cfg = FedtuneConfig(clients=2, rounds=1)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            simulate(cfg, RunDirectory.create(Path(tmp) / "run", cfg), Console(quiet=True))
        except RuntimeError:
            pass
    import ray
    print("ray left running", ray.is_initialized())
""")


def test_a_simulation_that_fails_before_flower_starts_leaves_no_ray_running():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", FAILS_BEFORE_FLOWER], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "ray left running False" in out.stdout, out.stdout + out.stderr[-2000:]


def test_ray_authentication_a_user_set_is_left_as_it_is(monkeypatch):
    """docs/privacy.md: fedtune turns on Ray's token authentication with a random per-process token,
    and a RAY_AUTH_MODE the user set themselves is left as it is (and so is their token)."""
    from fedtune.simulation.engine import require_ray_token

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    require_ray_token()
    token = os.environ["RAY_AUTH_TOKEN"]
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(token) == 64
    require_ray_token()
    assert os.environ["RAY_AUTH_TOKEN"] == token, "one token per process"

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-users-own")
    require_ray_token()
    assert (os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]) == ("disabled", "the-users-own")
