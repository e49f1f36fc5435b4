"""`fedtune deploy-local` as a user runs it, each test with a deployment of its own (SuperLink and
SuperNodes on loopback): Ctrl-C stops every process, and institutions whose node config requires DP
refuse a run without it. Apart from test_deployment.py, whose tests share one federation, so that
the two test workers can run them side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.test_deployment import SHORT_HEARTBEAT, _alive, _cmdline, _ledger, _wait_for

pytestmark = pytest.mark.integration


def _fedtune(args: list[str], short_heartbeat: bool = False) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test run started in the background by a shell without
    # job control (`bash .ci/run &`) inherits SIGINT ignored, and Python then never raises Ctrl-C.
    # short_heartbeat: its SuperNodes heartbeat every 10 s, not 30 s, so a resume waits about 20 s, not up
    # to 60 s, for the SuperLink to let go of the stopped ones (short_heartbeat/sitecustomize.py).
    path = os.pathsep.join([str(SHORT_HEARTBEAT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": path} if short_heartbeat else {})}
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_deploy_local_stops_every_process_on_ctrl_c(tmp_path):
    config = tmp_path / "tiny.toml"
    # Several rounds, so that the run is still going when the signal comes even on a loaded machine
    # (with one round, CI once saw the run finish first); Ctrl-C ends it long before the last.
    config.write_text('rounds = 4\n[train]\nbatch_size = 16\n[data]\ndemo_examples = 300\n')
    out = tmp_path / "run"
    cli = _fedtune(["deploy-local", "--nodes", "3", "--config", str(config), "--out", str(out)])
    seen: dict[int, psutil.Process] = {}

    def started_all() -> bool:
        for proc in psutil.Process(cli.pid).children(recursive=True):
            seen.setdefault(proc.pid, proc)
        commands = {" ".join(_cmdline(p)) for p in seen.values()}
        return cli.poll() is not None or (any("flower-superlink" in c for c in commands)
                                          and sum("flower-supernode" in c for c in commands) == 3)

    try:
        _wait_for(started_all, "the SuperLink and three SuperNodes", timeout_s=300)
        assert cli.poll() is None, cli.communicate()[1][-3000:]
        time.sleep(1)
        started_all()
        cli.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal would
        stdout, stderr = cli.communicate(timeout=180)  # generous: CI machines may be loaded
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        alive = [p for p in seen.values() if _alive(p)]
        for proc in alive:  # leave nothing behind, even when the test fails
            proc.kill()
    assert cli.returncode == 130, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out.resolve())
    assert not alive, [_cmdline(p) for p in alive]
    assert (out / "config.toml").is_file(), "the run directory stays, to resume or inspect"


def test_institutions_that_require_dp_refuse_a_run_without_it(tmp_path, tiny_classifier):
    """The server's run config asks for no DP; each institution's node config requires it: nobody
    trains, each refusal is on record with its reason, and the command says why it stopped."""
    out = tmp_path / "run"
    # 200 demo examples, not 6,000, and the tiny classifier: the server's round-0 evaluation stays small
    cli = _fedtune(["deploy-local", "--nodes", "2", "--rounds", "1", "--no-dp", "--node-config", "require-dp=true",
                    "--examples", "200", "--model", str(tiny_classifier), "--out", str(out)])
    stdout, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 2, stderr[-3000:]
    assert "No institution trained" in stderr and "require-dp" in stderr
    for name, entries in _ledger(out).items():
        assert [(e["status"], e["steps"]) for e in entries] == [("refused", 0)], name
        assert "require-dp" in entries[0]["reason"]
        own = json.loads((out / "deployment" / name / "state" / f"{name}.json").read_text())
        assert own["history"] == [] and own["ledger"][-1]["status"] == "refused"
    assert not (out / "checkpoints" / "round_0001.pt").exists(), "no round was committed"


def test_an_interrupted_deployment_resumes_with_the_same_institutions_and_their_spending(tmp_path, tiny_classifier):
    """Ctrl-C after round 1, then `deploy-local --resume`: the same registered keys (node ids), each
    institution's own state directory, so every client's ε goes on rising from what it spent instead
    of starting again from 0; the run finishes its rounds and its ledger passes privacy-verify."""
    out = tmp_path / "run"
    cli = _fedtune(["deploy-local", "--nodes", "2", "--rounds", "3", "--examples", "200", "--model",
                    str(tiny_classifier), "--out", str(out)], short_heartbeat=True)
    try:
        _wait_for(lambda: cli.poll() is not None or (out / "checkpoints" / "round_0001.pt").is_file(),
                  "round 1's checkpoint", timeout_s=300)
        assert cli.poll() is None, cli.communicate()[1][-3000:]
        cli.send_signal(signal.SIGINT)
        stdout, stderr = cli.communicate(timeout=180)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    assert cli.returncode == 130 and f"fedtune deploy-local --resume {out.resolve()}" in " ".join(stderr.split())
    ids = json.loads((out / "deployment" / "coordinator" / "node-ids.json").read_text())

    again = _fedtune(["deploy-local", "--resume", str(out)], short_heartbeat=True)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, (stdout + stderr)[-3000:]
    said = " ".join(stderr.split())
    assert "resuming after round" in said and all(f"{name}: SuperNode {node}," in said for name, node in ids.items())
    assert (out / "checkpoints" / "round_0003.pt").is_file()
    for name, entries in _ledger(out).items():
        trained = [e for e in entries if e["status"] == "trained"]
        assert [e["round"] for e in trained] == [1, 2, 3], name
        spent = [e["epsilon"] for e in trained]
        assert spent == sorted(spent) and spent[0] < spent[-1], f"{name}'s ε started again: {spent}"
        own = json.loads((out / "deployment" / name / "state" / f"{name}.json").read_text())
        assert own["ledger"][-1]["epsilon"] == pytest.approx(spent[-1]), "the institution's own record agrees"
    verify = subprocess.run([sys.executable, "-m", "fedtune.cli", "privacy-verify", str(out)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert verify.returncode == 0 and "privacy-verify: OK" in verify.stdout + verify.stderr, verify.stderr
