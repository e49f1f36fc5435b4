"""The Ray behind `fedtune simulate` refuses callers without the run's token (simulation/engine.py).

Ray's servers listen on every interface; without authentication anyone who reaches a port could
join the cluster. The cluster runs in a child process here, as `fedtune simulate` starts it, and
two callers try to join: one without the token, one with it (so a refusal is the token's doing,
not the network's)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CLUSTER = textwrap.dedent("""
    import os, subprocess, sys
    from fedtune.simulation.engine import require_ray_token
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
    ray.shutdown()
""")


def test_a_caller_without_the_token_cannot_join_the_simulations_ray():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", CLUSTER], env=env, capture_output=True, text=True, timeout=300)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("outsider", "holder")))
    assert lines == {"outsider": "REFUSED ConnectionError", "holder": "JOINED"}, out.stdout + out.stderr[-2000:]
