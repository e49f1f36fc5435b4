"""A real deployment on loopback: one SuperLink and three SuperNodes as separate processes, TLS on
every connection, only registered SuperNodes admitted, the run submitted with `flwr run`.

One run covers the faults, in this order: an institution's SuperNode is killed in the middle of
round 1 (the round completes with the other two, the failure is in the ledger); the ServerApp
process is killed once round 1 is committed; the SuperNode comes back and the run is submitted
again, and resumes at round 2 with all three (nothing lost, no ε reset). Every process a test
starts is stopped by the fixtures, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from fedtune.config import FedtuneConfig
from fedtune.deploy.local import HOST, SUPERLINK, DeployError, LocalFederation, app_config_keys, app_dir, superexec_name
from fedtune.deploy.processes import ProcessSet
from fedtune.deploy.run import run_config

pytestmark = pytest.mark.integration

NAMES = ["clinic-a", "clinic-b", "clinic-c"]
VICTIM = "clinic-c"  # the institution whose SuperNode dies mid-round
TINY = FedtuneConfig.from_nested({
    "rounds": 2, "clients": 3,
    # Backstop only: a dead node is reported by the SuperLink once its heartbeat lapses (<= 20 s for
    # the victim, which sends Flower's shortest heartbeat; <= 60 s at the default).
    "round_timeout_s": 300.0,
    "lora": {"r": 4}, "train": {"batch_size": 16},
    "dp": {"noise_multiplier": 0.8},
    "strategy": {"fraction_evaluate": 0.0},  # one ClientApp process per node and round, not two
    "data": {"demo_examples": 300, "test_fraction": 0.25},
})
WAIT_S = 300
SHORT_HEARTBEAT = Path(__file__).parent / "short_heartbeat"  # its sitecustomize.py says what it does


def _wait_for(condition, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _child(processes: ProcessSet, name: str, command: str) -> psutil.Process | None:
    """A live descendant of `name` or of its SuperExec running `command` (e.g. flwr-clientapp)."""
    owners = [n for n in (name, superexec_name(name)) if n in processes.started]
    for proc in [p for owner in owners for p in processes.tree(owner)[1:]]:
        try:
            if any(command in part for part in proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink with TLS and SuperNode authentication, three registered institutions and one
    unregistered (its key pair exists, the coordinator never registered it). All stopped after."""
    work = tmp_path_factory.mktemp("deployment")
    with ProcessSet(work / "logs") as processes:
        fed = LocalFederation(work / "federation", processes, app_dir())
        fed.prepare([*NAMES, "intruder"])
        fed.start_superlink()
        fed.register(NAMES)
        for index, name in enumerate(NAMES):
            with pytest.MonkeyPatch.context() as patch:
                if name == VICTIM:  # it dies mid-round: the SuperLink notices in ~20 s rather than up to 60 s
                    patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SHORT_HEARTBEAT),
                                                                             os.environ.get("PYTHONPATH")])))
                fed.start_node(name, {"partition-id": index, "num-partitions": len(NAMES)})
        fed.start_node("intruder", {"partition-id": 0, "num-partitions": len(NAMES)})  # never registered
        yield fed
    assert not processes.leftovers(), "every process the fixture started is stopped"


def _acquire_task(port: int, ca: Path) -> int:
    """The HTTP status of an unsigned request for a task on a runtime API (what a SuperExec asks)."""
    import ssl
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"https://{HOST}:{port}/v1/runtime/acquire-task", data=b"", method="POST",
                                     headers={"content-type": "application/protobuf"})

    def answer() -> int | None:
        try:
            with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except urllib.error.URLError:
            return None  # the node's API is not up yet

    return _wait_for(answer, f"the runtime API on port {port}", poll_s=0.5)


def test_runtime_apis_refuse_a_caller_without_the_superexec_secret(federation):
    """The review's finding: /v1/runtime/acquire-task answered 200 with no credentials, handing out
    a pending task and its token to whoever reached the port."""
    assert _acquire_task(federation.port, federation.certs / "ca.crt") == 401
    for name in NAMES:
        inst = federation.institutions[name]
        assert _acquire_task(inst.runtime_port, inst.directory / "runtime-tls" / "ca.crt") == 401, name


def test_an_unregistered_supernode_is_refused(federation):
    intruder = federation.processes.started["intruder"]
    code = intruder.popen.wait(timeout=120)
    assert code != 0
    assert "Failed to activate SuperNode" in intruder.log.read_text()
    for name in NAMES:  # the registered ones connected and stay up
        assert federation.processes.started[name].running(), federation.processes.started[name].log_tail()


@pytest.fixture(scope="module")
def faulty_run(federation, tiny_classifier) -> Path:
    """Run 2 rounds with DP through `flwr run`; kill a SuperNode mid-round 1 and the ServerApp
    after round 1; bring the node back and submit again. Returns the run directory. On the tiny
    classifier: what is checked is who trained, failed and spent what, not what the model learnt."""
    fed, processes = federation, federation.processes
    out = fed.work / "run"
    values = run_config(TINY.with_overrides({"out": str(out), "model.name_or_path": str(tiny_classifier)}),
                        app_config_keys(fed.app))
    started = time.monotonic()
    fed.submit(values, label="first")

    # Mid-round 1: the victim has pulled its training message and is training.
    _wait_for(lambda: _child(processes, VICTIM, "flwr-clientapp"), f"{VICTIM} to start training")
    processes.kill(VICTIM)  # the institution's machine dies: its SuperNode and the SuperExec running its ClientApp
    processes.kill(superexec_name(VICTIM))
    # Round 1 completes with the other two once the SuperLink reports the victim unavailable.
    _wait_for(lambda: (out / "checkpoints" / "round_0001.pt").exists(), "round 1 to be committed")
    # The ServerApp now waits for a third node before round 2 (no message is in flight): kill it.
    serverapp = _wait_for(lambda: _child(processes, SUPERLINK, "flwr-serverapp"), "the ServerApp process")
    serverapp.kill()
    _wait_for(lambda: not _alive(serverapp), "the ServerApp to exit", timeout_s=30)
    killed_at = time.monotonic()

    fed.start_node(VICTIM, {"partition-id": NAMES.index(VICTIM), "num-partitions": len(NAMES)})  # it rejoins
    run_id = fed.submit(values, label="resumed")
    lines: list[str] = []
    status = fed.follow(run_id, WAIT_S, echo=lines.append)
    (fed.work / "resumed.log").write_text("\n".join(lines))
    assert status == "finished:completed", "\n".join(lines[-30:])
    print(f"deployment run: {killed_at - started:.0f} s to the ServerApp kill, {time.monotonic() - killed_at:.0f} s "
          "resumed")
    return out


def _ledger(run: Path) -> dict[str, list[dict]]:
    return json.loads((run / "privacy_ledger.json").read_text())["clients"]


def test_the_round_completes_without_the_dead_node_and_records_its_failure(faulty_run):
    rows = [json.loads(line) for line in (faulty_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert (rows[1]["num_clients"], rows[1]["num_failed"]) == (2, 1)
    assert (rows[2]["num_clients"], rows[2]["num_failed"]) == (3, 0), "the node rejoined for round 2"
    assert rows[2]["epsilon_max"] > 0
    ledger = _ledger(faulty_run)
    assert sorted(ledger) == NAMES, "the failure recorded under the node id joined the institution's name"
    victim = ledger[VICTIM]
    assert [(e["round"], e["status"]) for e in victim] == [(1, "failed"), (2, "trained")]
    assert victim[0]["reason"]


def test_server_restart_resumes_at_the_next_round_without_losing_or_resetting_anything(faulty_run, federation):
    resumed = (federation.work / "resumed.log").read_text()
    assert f"Resuming {faulty_run} after round 1." in resumed
    assert "round 1/2" not in resumed, "round 1 was not repeated"
    for name in ("clinic-a", "clinic-b"):
        entries = _ledger(faulty_run)[name]
        assert [(e["round"], e["status"]) for e in entries] == [(1, "trained"), (2, "trained")]
        assert 0 < entries[0]["epsilon"] < entries[1]["epsilon"], "ε grows across the restart, never reset"
    assert (faulty_run / "summary.json").is_file() and (faulty_run / "adapter").is_dir()


def test_each_institution_keeps_its_own_ledger_matching_the_servers(faulty_run, federation):
    server = _ledger(faulty_run)
    for name in NAMES:
        own = json.loads(federation.institutions[name].state_file.read_text())
        assert own["client"] == name
        trained = [e["round"] for e in server[name] if e["status"] == "trained"]
        assert [e["round"] for e in own["ledger"] if e["status"] == "trained"][-len(trained):] == trained
        assert own["ledger"][-1]["epsilon"] == pytest.approx(server[name][-1]["epsilon"])
        assert own["history"], "the accountant history that ε is computed from"
    assert not list(faulty_run.rglob("*.key")), "no private key sits in the run directory"


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_superlink_crash_ends_the_wait_and_leaves_no_process(federation, tiny_classifier):
    """The review's finding: after the SuperLink crashed, deploy-local left the ServerApp process
    running. The SuperLink is killed alone mid-run, as a crash would; following the run stops with
    the reason, and stopping the set ends every process, the ServerApp included (it is orphaned,
    out of every process tree, and found by its session). Last in this module: it ends the SuperLink."""
    fed, processes = federation, federation.processes
    values = run_config(TINY.with_overrides({"out": str(fed.work / "crashed-link"),
                                             "model.name_or_path": str(tiny_classifier)}), app_config_keys(fed.app))
    run_id = fed.submit(values, label="crashed-link")
    serverapp = _wait_for(lambda: _child(processes, SUPERLINK, "flwr-serverapp"), "the ServerApp process")
    os.kill(processes.started[SUPERLINK].pid, signal.SIGKILL)
    with pytest.raises(DeployError, match="SuperLink stopped during the run"):
        fed.follow(run_id, WAIT_S)
    processes.stop_all(grace_s=5.0)
    assert not _alive(serverapp), _cmdline(serverapp)
    assert not processes.leftovers(), [_cmdline(p) for p in processes.leftovers()]
