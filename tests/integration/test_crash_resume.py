"""Crash safety: a run killed between rounds resumes; no client's ε is reset and no ledger
entry is lost, even for a client whose state file was deleted meanwhile (it refuses to train
rather than restart from ε = 0). Runs with --target-epsilon, so it also checks the solved sigma
end to end, and `fedtune privacy-verify` passes on the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from fedtune.privacy.independent import independent_epsilon
from tests.integration.test_simulate import TINY, fedtune, fedtune_here, history_from_ledger

pytestmark = pytest.mark.integration
TARGET = 3.0
LOST = "client-0001"


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _kill_when(process: subprocess.Popen, ready: Path, timeout_s: float = 900) -> None:
    """SIGKILL the whole process group (server and Ray workers) once `ready` exists."""
    deadline = time.monotonic() + timeout_s
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), "the run never finished its first round"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _ledger(run: Path) -> dict[str, list[dict]]:
    return json.loads((run / "privacy_ledger.json").read_text())["clients"]


def test_killed_run_resumes_without_losing_or_resetting_budget(tmp_path, tiny_classifier):
    # On the tiny classifier (what is spent depends on data, σ and batch size, not the model); 3 rounds, so
    # the run is still going when it is killed even if round 2 is quick.
    (tmp_path / "tiny.toml").write_text(TINY.replace("rounds = 2", "rounds = 3"))
    run = tmp_path / "run"
    _kill_when(_start(["simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(run),
                       "--target-epsilon", str(TARGET), "--model", str(tiny_classifier)]),
               run / "checkpoints" / "round_0001.pt")
    before = _ledger(run)
    assert not (run / "summary.json").exists(), "the run really was cut short"
    (run / "client_state" / f"{LOST}.json").unlink()  # one institution loses its privacy state

    result = fedtune("simulate", "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    after = _ledger(run)
    lost = [e for e in after[LOST] if e["round"] > 1 and not e.get("interrupted")]
    assert lost and all(e["status"] == "refused" and "lost" in e["reason"] for e in lost), \
        "a client that lost its state refuses instead of restarting its ε from nothing"
    code, stdout, stderr = fedtune_here("privacy-verify", str(run))
    assert code == 0, stdout + stderr
    assert [json.loads(r)["round"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    for name, entries in after.items():
        assert entries[:len(before[name])] == before[name], "no entry written before the crash is lost"
        spent = [e["epsilon"] for e in entries]
        assert spent == sorted(spent) and spent[0] > 0, "ε only grows: never reset by the restart"
        assert {e["noise_multiplier"] for e in entries if e["steps"]} == {entries[0]["noise_multiplier"]}
        assert spent[-1] <= TARGET * 1.001, "the solved sigma keeps every client within its target"
        assert spent[-1] == pytest.approx(independent_epsilon("prv", history_from_ledger(entries), 1e-5), rel=0.01)
        # The institution's own copy holds every round the server heard of (and any it spent on
        # while the server was down), and its last ε is the latest.
        if name == LOST:
            continue
        own = json.loads((run / "client_state" / f"{name}.json").read_text())["ledger"]
        heard = Counter(e["round"] for e in entries if e["status"] != "failed")
        assert not heard - Counter(e["round"] for e in own)
        assert own[-1]["epsilon"] == spent[-1]
    finished = [name for name, entries in after.items() if entries[-1]["status"] == "trained"]
    for name in finished:  # a client that trained all planned rounds spent (almost) exactly its target
        if sum(e["status"] == "trained" for e in after[name]) == 3:
            assert after[name][-1]["epsilon"] == pytest.approx(TARGET, rel=0.01)


def test_ctrl_c_stops_the_run_within_seconds_and_it_resumes(tmp_path):
    """The first Ctrl-C stops everything: no later round is committed, no client is recorded as
    failed for a round that never trained, no process is left, and the run resumes. (It used to
    print "Interrupted." and keep the server running its rounds for round_timeout_s per phase.)"""
    (tmp_path / "tiny.toml").write_text("round_timeout_s = 45.0\n" + TINY.replace("rounds = 2", "rounds = 4"))
    run = tmp_path / "run"
    args = ["simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(run)]
    process = subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 900
        while not (run / "checkpoints" / "round_0001.pt").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # into round 2's training
        started = {p.pid: p for p in psutil.Process(process.pid).children(recursive=True)}
        started.update({p.pid: p for p in psutil.process_iter() if _session(p) == process.pid})
        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C to the foreground group
        _, stderr = process.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert took < 30, f"took {took:.0f} s to stop"
    committed = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert committed[-1] in ("round_0001.pt", "round_0002.pt") and "round_0003.pt" not in committed
    assert not [e for entries in _ledger(run).values() for e in entries if e["status"] == "failed"], \
        "no client is recorded as failed for a round the run abandoned"
    deadline = time.monotonic() + 30  # Ray's helpers exit on their own after the driver
    while (left := [p for p in started.values() if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [_name(p) for p in left]
    last = int(committed[-1].removeprefix("round_").removesuffix(".pt"))
    resumed = fedtune("simulate", "--resume", str(run), "--rounds", str(last + 1))  # one more round to train
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(r)["round"] for r in (run / "metrics.jsonl").read_text().splitlines()] == list(range(last + 2))


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except (OSError, psutil.Error):
        return None


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:120]
    except psutil.Error:
        return str(proc.pid)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
