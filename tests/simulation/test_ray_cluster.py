"""The Ray behind `fedtune simulate` (simulation/engine.py), checked on a real cluster in a child
process, as `fedtune simulate` starts it:
- it refuses callers without the run's token. Ray's servers listen on every interface; without
  authentication anyone who reaches a port could join. Two callers try: one without the token and
  one with it (so a refusal is the token's doing, not the network's);
- a worker that dies is restarted with the options fedtune gives Flower's worker actors, so later
  rounds have their clients again (a run once went on for 18 rounds with 1 of 20 clients)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CLUSTER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from fedtune.config import FedtuneConfig
    from fedtune.simulation.engine import backend_config, require_ray_token
    require_ray_token()
    import ray
    info = ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    caller = ("import ray\\ntry:\\n ray.init(address=%r, logging_level='ERROR'); print('JOINED')\\n"
              "except Exception as err: print('REFUSED', type(err).__name__)") % info["gcs_address"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base["RAY_py_gcs_connect_timeout_s"] = "5"
    for label, env in (("outsider", base), ("holder", dict(os.environ, RAY_py_gcs_connect_timeout_s="5"))):
        out = subprocess.run([sys.executable, "-c", caller], env=env, capture_output=True, text=True, timeout=120)
        print(label, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "nothing")

    @ray.remote
    class Worker:
        def pid(self):
            return os.getpid()

    worker = Worker.options(**backend_config(FedtuneConfig())["client_resources"]).remote()
    first = ray.get(worker.pid.remote())
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
    out = subprocess.run([sys.executable, "-c", CLUSTER], env=env, capture_output=True, text=True, timeout=300)
    said = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                if line.startswith(("outsider", "holder", "restarted")))
    return {**said, "log": out.stdout + out.stderr[-2000:]}


def test_a_caller_without_the_token_cannot_join_the_simulations_ray(cluster):
    assert (cluster.get("outsider"), cluster.get("holder")) == ("REFUSED ConnectionError", "JOINED"), cluster["log"]


def test_a_killed_worker_is_replaced(cluster):
    assert cluster.get("restarted") == "True", cluster["log"]
