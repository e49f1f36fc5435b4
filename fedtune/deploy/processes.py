"""The processes a local deployment starts, and stopping every one of them.

Each process starts in a new session (its own process group), so a Ctrl-C in the terminal
reaches only fedtune, which then stops them in order. Flower's own children escape a
process group (the SuperLink starts its SuperExec in a new session), so stopping also walks
each process's descendants, collected before anything is signalled: SIGTERM first, SIGKILL
for whatever is still alive after the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

GRACE_S = 10.0


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class ProcessSet:
    """Processes started by name; `stop_all()` (or leaving the `with` block) ends them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: dict[str, Started] = {}

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        # A second Ctrl-C must not cut the clean-up short: ignore SIGINT while stopping.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.stop_all()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> Started:
        """Start `argv` in a new session, stdout and stderr to `log_dir/<name>.log`."""
        if name in self.started and self.started[name].running():
            raise RuntimeError(f"{name} is already running (pid {self.started[name].pid}).")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        self.started[name] = Started(name, popen, log)
        return self.started[name]

    def tree(self, name: str) -> list[psutil.Process]:
        """The live process `name` and all its descendants."""
        return _tree(self.started[name].pid)

    def kill(self, name: str) -> None:
        """SIGKILL `name` and its descendants at once: a crash, not a shutdown."""
        _signal_all([self.started[name]], signal.SIGKILL)
        self.started[name].popen.wait()

    def stop(self, names: Iterable[str], grace_s: float = GRACE_S) -> None:
        """SIGTERM these processes and their descendants; SIGKILL what outlives `grace_s`."""
        chosen = [self.started[n] for n in names if n in self.started]
        procs = _signal_all(chosen, signal.SIGTERM)
        alive = _wait_gone(procs, grace_s)
        if alive:
            _signal_all(chosen, signal.SIGKILL, extra=alive)
            _wait_gone(alive, 5.0)
        for started in chosen:
            try:
                started.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that survived SIGKILL
                pass

    def stop_all(self, grace_s: float = GRACE_S) -> None:
        self.stop(list(self.started), grace_s)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this set still alive (for checks after stop_all): each started one and its
        descendants, and also any process left in a session this set started, which finds an
        orphan whose parent has died (it is re-parented to init, out of every tree)."""
        return [p for p in _members(list(self.started.values())) if _alive(p)]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _members(started: Sequence[Started]) -> list[psutil.Process]:
    """Each started process, its descendants, and every other process still in a session one of
    them leads (an orphan re-parented to init is in no tree, but keeps its session)."""
    found = {p.pid: p for s in started for p in _tree(s.pid)}
    sessions = {s.pid for s in started}
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and os.getsid(proc.pid) in sessions:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError):
            pass
    return list(found.values())


def _signal_all(started: Sequence[Started], sig: int, extra: Sequence[psutil.Process] = ()) -> list[psutil.Process]:
    """Send `sig` to each process group and to every member found first (_members); returns those."""
    procs = _members(started)
    procs += [p for p in extra if p not in procs]
    for s in started:
        try:
            os.killpg(s.pid, sig)  # the session we made: everything still in that group
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses if the pid was reused meanwhile
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process in `procs` has exited (zombies count as exited); returns the rest."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        for proc in alive:
            try:
                proc.wait(timeout=0)  # reaps our own children
            except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
                pass
        alive = [p for p in alive if _alive(p)]
    return alive
