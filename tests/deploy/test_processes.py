"""Stopping a deployment ends every process it started, including grandchildren that moved to a
session of their own (as Flower's SuperExec does) and processes that ignore SIGTERM."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from fedtune.deploy.processes import ProcessSet

# A parent that starts a child in a new session (like flower-superlink starts flower-superexec),
# writes the child's pid, then waits. With IGNORE, both ignore SIGTERM.
PARENT = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                          "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                          "time.sleep(600)", sys.argv[1]], start_new_session=True)
open(sys.argv[2], "w").write(str(child.pid))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start(processes: ProcessSet, name: str, mode: str, tmp_path) -> tuple[int, int]:
    pid_file = tmp_path / f"{name}.pid"
    started = processes.start(name, [sys.executable, "-c", PARENT, mode, str(pid_file)])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return started.pid, int(pid_file.read_text())


@pytest.mark.parametrize("mode", ["polite", "ignore"])
def test_stop_all_ends_children_in_other_sessions_too(tmp_path, mode):
    with ProcessSet(tmp_path / "logs") as processes:
        parent, child = _start(processes, "parent", mode, tmp_path)
        assert _alive(parent) and _alive(child)
        assert psutil.Process(child).pid in {p.pid for p in processes.tree("parent")}
        started = time.monotonic()
        processes.stop_all(grace_s=1.0)
        assert time.monotonic() - started < 10
    assert not _alive(parent) and not _alive(child)
    assert processes.leftovers() == []


def test_leaving_the_block_on_an_exception_stops_everything(tmp_path):
    with pytest.raises(KeyboardInterrupt), ProcessSet(tmp_path / "logs") as processes:
        parent, child = _start(processes, "parent", "polite", tmp_path)
        raise KeyboardInterrupt  # Ctrl-C in the middle of a deployment
    assert not _alive(parent) and not _alive(child)


def test_kill_is_immediate_and_a_killed_name_can_start_again(tmp_path):
    with ProcessSet(tmp_path / "logs") as processes:
        parent, child = _start(processes, "node", "ignore", tmp_path)
        processes.kill("node")
        deadline = time.monotonic() + 5
        while (_alive(parent) or _alive(child)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(parent) and not _alive(child)
        (tmp_path / "node.pid").unlink()
        again, _ = _start(processes, "node", "polite", tmp_path)
        assert again != parent and _alive(again)
        with pytest.raises(RuntimeError, match="already running"):
            processes.start("node", [sys.executable, "-c", "pass"])


def test_an_orphan_whose_parent_died_is_still_found_and_stopped(tmp_path):
    """leftovers() used to look only below live parents, so a leak check could not see an orphan."""
    orphan_maker = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
    with ProcessSet(tmp_path) as processes:
        parent = processes.start("parent", [sys.executable, "-c", orphan_maker])
        parent.popen.wait(timeout=30)  # the parent is gone; its child lives on, re-parented
        deadline = time.monotonic() + 30
        while not processes.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = processes.leftovers()
        assert len(orphans) == 1 and "sleep" in " ".join(orphans[0].cmdline())
    assert not processes.leftovers() and not _alive(orphans[0].pid)
