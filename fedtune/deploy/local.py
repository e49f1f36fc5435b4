"""A whole federation on this machine, run the way institutions run it (`fedtune deploy-local`).

One SuperLink (the coordinator) and one SuperNode per institution, each its own process with its
own Flower home, on 127.0.0.1; TLS on every connection, from a development CA (certs.py);
SuperNode authentication on: each institution's public key is registered with
`flwr supernode register` before its node starts, and the SuperLink refuses any other key. Each
runtime API (the SuperLink's, for the ServerApp, and every SuperNode's, for its ClientApp) hands
out tasks only to a `flower-superexec` holding that machine's shared secret (`--isolation process
--superexec-auth-secret-file`), so a process that merely reaches the port cannot take a task. The
run is submitted with `flwr run` and followed with `flwr log`, as docs/deployment.md describes.
fedtune adds no transport of its own.

The working directory mirrors the machines involved:

    coordinator/  certs/ (CA, SuperLink certificate and key), keys/ (registered public keys),
                  superexec.secret, superlink.db, node-ids.json, flwr-home/, cli-home/config.toml (the `flwr`
                  connection)
    <name>/       one per institution: its private key, the CA certificate, node-config.toml,
                  superexec.secret, state/<name>.json (its privacy state and own ledger), runtime-tls/,
                  flwr-home/
    logs/         one log per process
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

import fedtune
from fedtune.deploy.certs import make_dev_certificates, make_node_key_pair
from fedtune.deploy.processes import ProcessSet, Started
from fedtune.durable import write_bytes_atomic, write_json_atomic, write_text_atomic
from fedtune.errors import FedtuneError

CONNECTION = "fedtune-local"  # the SuperLink connection name in the coordinator's flwr config
HOST = "127.0.0.1"
SUPERLINK = "superlink"
START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0
SECRET = "superexec.secret"  # a machine's SuperExec shared secret (raw bytes, mode 0600)
SECRET_BYTES = 32  # random bytes in a SuperExec secret
NODE_IDS = "node-ids.json"  # in coordinator/: the node id each institution's key was registered with
KEY_IN_USE = "Public key already in use"  # flwr 1.42's refusal to register a key its database holds


class DeployError(FedtuneError):
    """A local deployment step failed; the message says which and shows its log."""


@dataclass(frozen=True)
class Institution:
    """One institution's machine: its own directory, keys, state and SuperNode."""

    name: str
    directory: Path
    runtime_port: int

    @property
    def private_key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @property
    def public_key(self) -> Path:
        return self.directory / f"{self.name}.pub"

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    @property
    def node_config(self) -> Path:
        return self.directory / "node-config.toml"

    @property
    def superexec_secret(self) -> Path:
        return self.directory / SECRET


def app_dir() -> Path:
    """The Flower App to submit: the fedtune checkout holding pyproject.toml."""
    root = Path(fedtune.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "flwr" not in tomllib.loads(pyproject.read_text()).get("tool", {}):
        raise DeployError(f"No Flower App at {root}: `flwr run` needs fedtune's source checkout. Install fedtune "
                          "from it with `pip install -e .` and run again.")
    return root


def app_config_keys(root: Path) -> set[str]:
    """The run-config keys the app declares: the only ones `flwr run --run-config` may set."""
    return set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tool(name: str) -> str:
    """A Flower command from this Python's environment (the venv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` was not found. Install Flower (pip install -e .) in this environment.")
    return found


class LocalFederation:
    """The coordinator and the institutions of one local deployment, in `work`."""

    def __init__(self, work: Path, processes: ProcessSet, app: Path | None = None):
        self.work = work.resolve()
        self.processes = processes
        self.app = app or app_dir()
        self.coordinator = self.work / "coordinator"
        self.certs = self.coordinator / "certs"
        self.institutions: dict[str, Institution] = {}
        self.port = 0

    # ---- set-up --------------------------------------------------------------------
    def prepare(self, names: Sequence[str]) -> None:
        """Certificates, one key pair per institution, the flwr connection, free ports."""
        self.port, *ports = free_ports(1 + len(names))
        private_dir(self.coordinator)  # superlink.db, the SuperExec secret and the flwr home: the coordinator's only
        make_dev_certificates(self.certs)
        (self.coordinator / "keys").mkdir(parents=True, exist_ok=True)
        for name, port in zip(names, ports, strict=True):
            self.add_institution(name, port)
        self._write_connection()

    def reopen(self, names: Sequence[str]) -> None:
        """The stopped deployment in `work`, on new free ports: the same CA, keys, SuperLink database
        and institutions, each with its own state directory (its privacy state and own ledger), so
        every institution goes on from the ε it has spent."""
        self.port, *ports = free_ports(1 + len(names))
        needed = [self.certs / "ca.crt", self.certs / "server.key", self.coordinator / "cli-home"]
        for name, port in zip(names, ports, strict=True):
            inst = Institution(name, self.work / name, port)
            needed += [inst.private_key, inst.node_config, inst.state_dir, inst.directory / "runtime-tls"]
            self.institutions[name] = inst
        missing = [str(path) for path in needed if not path.exists()]
        if missing:
            raise DeployError(f"{self.work} is not a whole deploy-local deployment ({', '.join(missing)} missing), "
                              "so its institutions cannot go on as themselves. Restore those files from a backup; "
                              "an institution without its state directory would start again from ε = 0.")
        self._write_connection()

    def saved_node_config(self, name: str) -> dict[str, Any]:
        """The node config `name`'s SuperNode last ran with (its own policy and partition), less its
        `client-name` and `state-dir`, which start_node sets to where the institution is now (a moved
        run directory keeps its institutions' state)."""
        path = self.institutions[name].node_config
        try:
            saved = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise DeployError(f"{path} cannot be read ({err}); restore it, or fix the TOML it names.") from None
        return {key: value for key, value in saved.items() if key not in ("client-name", "state-dir")}

    def _write_connection(self) -> None:
        """The coordinator's `flwr` connection to this SuperLink (cli-home/config.toml)."""
        cli_home = self.coordinator / "cli-home"
        cli_home.mkdir(parents=True, exist_ok=True)
        connection = {"address": f"{HOST}:{self.port}", "root-certificates": str(self.certs / "ca.crt")}
        write_text_atomic(cli_home / "config.toml", tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                                 CONNECTION: connection}}))

    def add_institution(self, name: str, runtime_port: int | None = None) -> Institution:
        """An institution's directory: it makes its own key pair and loopback TLS certificate and
        receives the CA certificate; only its public key goes to the coordinator."""
        inst = Institution(name, self.work / name, runtime_port or free_ports(1)[0])
        private_dir(inst.directory, exist_ok=False)  # its key, node config and privacy state: its own only
        make_node_key_pair(inst.directory, name)
        make_dev_certificates(inst.directory / "runtime-tls")  # its SuperNode's own loopback API
        shutil.copy(self.certs / "ca.crt", inst.directory / "ca.crt")
        shutil.copy(inst.public_key, self.coordinator / "keys" / inst.public_key.name)
        inst.state_dir.mkdir()
        self.institutions[name] = inst
        return inst

    def env(self, home: Path, threads: int | None = None) -> dict[str, str]:
        """The environment of one Flower process: its own Flower home, this Python's tools first;
        `threads` caps its torch/OpenMP threads unless the user set OMP_NUM_THREADS."""
        env = dict(os.environ)
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        env["FLWR_HOME"] = str(home)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("NO_COLOR", "1")
        return env

    # ---- the coordinator ------------------------------------------------------------
    def start_superlink(self, before_superexec: Callable[[], None] | None = None) -> Started:
        """The SuperLink with TLS and SuperNode authentication; returns once it answers.
        `before_superexec` runs once the SuperLink answers and before its SuperExec starts taking tasks."""
        secret = kept_secret(self.coordinator / SECRET)
        argv = [tool("flower-superlink"),
                "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                "--ssl-certfile", str(self.certs / "server.crt"),
                "--ssl-keyfile", str(self.certs / "server.key"),
                "--enable-supernode-auth",
                "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                "--host", HOST, "--port", str(self.port),
                "--database", str(self.coordinator / "superlink.db"),
                "--disable-runtime-dependency-installation"]
        started = self.processes.start(SUPERLINK, argv, self.env(self.coordinator / "flwr-home"), cwd=self.coordinator)
        self._wait_healthy(started)
        if before_superexec is not None:
            before_superexec()
        self._start_superexec(SUPERLINK, self.port, self.certs / "ca.crt", secret, started,
                              self.env(self.coordinator / "flwr-home"), self.coordinator)
        return started

    def _start_superexec(self, owner: str, runtime_port: int, ca: Path, secret: Path, parent: Started,
                         env: dict[str, str], cwd: Path) -> Started:
        """The SuperExec that takes `owner`'s tasks from its runtime API (signed with the shared secret)
        and runs each ServerApp or ClientApp as a subprocess; it exits with its parent."""
        name = superexec_name(owner)
        if name in self.processes.started and self.processes.started[name].running():
            self.processes.stop([name], grace_s=2.0)  # the one its previous parent left behind
        argv = [tool("flower-superexec"), "--runtime-api-address", f"{HOST}:{runtime_port}",
                "--root-certificates", str(ca), "--superexec-auth-secret-file", str(secret),
                "--parent-pid", str(parent.popen.pid)]
        return self.processes.start(name, argv, env, cwd=cwd)

    def _wait_healthy(self, started: Started) -> None:
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not started.running():
                raise DeployError(f"The SuperLink exited at start (see {started.log}):\n{started.log_tail()}")
            try:
                with urllib.request.urlopen(f"https://{HOST}:{self.port}/health", context=context, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise DeployError(f"The SuperLink did not answer within {START_TIMEOUT_S:.0f} s (see {started.log}).")

    def flwr(self, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> str:
        """Run the `flwr` CLI as the coordinator; returns its stdout, raises DeployError on failure."""
        argv = [tool("flwr"), *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  env=self.env(self.coordinator / "cli-home"), cwd=self.coordinator)
        except subprocess.TimeoutExpired as err:
            raise DeployError(f"`flwr {' '.join(args)}` did not finish within {timeout_s:.0f} s.") from err
        if done.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}):\n"
                              f"{(done.stdout + done.stderr).strip()[-2000:]}")
        return done.stdout

    def register(self, names: Sequence[str], known: Mapping[str, int] | None = None) -> dict[str, int]:
        """`flwr supernode register` each institution's public key; returns the node ids, kept in
        NODE_IDS as each is known. A key the SuperLink's database already holds (a reopened deployment)
        keeps the id it was registered with: NODE_IDS's, or `known`'s (a deployment from before NODE_IDS,
        whose checkpoints name its nodes)."""
        known = {**(known or {}), **self.node_ids()}
        ids: dict[str, int] = {}
        lock = threading.Lock()

        def one(name: str) -> None:
            try:
                node = int(_json_tail(self.flwr("supernode", "register", str(self.coordinator / "keys" / f"{name}.pub"),
                                                 CONNECTION, "--name", name, "--format", "json"))["node-id"])
            except DeployError as err:
                if KEY_IN_USE not in str(err) or name not in known:
                    raise
                node = known[name]
            with lock:  # kept at once: a later failure must not lose a registration the database holds
                ids[name] = node
                write_json_atomic(self.coordinator / NODE_IDS, {**self.node_ids(), **ids})

        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            list(pool.map(one, names))
        return {name: ids[name] for name in names}

    def node_ids(self) -> dict[str, int]:
        """The node id each institution was registered with (NODE_IDS), or {} before any."""
        path = self.coordinator / NODE_IDS
        try:
            return {str(name): int(node) for name, node in json.loads(path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def wait_nodes(self, ids: Mapping[str, int], online: bool, timeout_s: float = CLI_TIMEOUT_S) -> None:
        """Wait until the SuperLink lists every institution's node as online (`online`), or none of them
        (not `online`). A reopened SuperLink's database holds each node as online until the heartbeat
        it got before the stop runs out (up to a minute); a node that reconnects before then keeps
        its stale entry, and a run submitted at once fails its first round as "Node Unavailable"."""
        deadline, waiting = time.monotonic() + timeout_s, dict(ids)
        while waiting and time.monotonic() < deadline:
            nodes = _json_tail(self.flwr("supernode", "list", CONNECTION, "--format", "json")).get("nodes", [])
            now_online = {int(node["node-id"]) for node in nodes if node.get("status") == "online"}
            waiting = {name: node for name, node in waiting.items() if (node in now_online) != online}
            if waiting:
                time.sleep(1.0)
        if waiting:
            what = "connect to" if online else "be released by"
            raise DeployError(f"{', '.join(sorted(waiting))} did not {what} the SuperLink within {timeout_s:.0f} s "
                              f"(the logs are in {self.processes.log_dir}).")

    def stop_unfinished_runs(self) -> list[int]:
        """Stop the runs a reopened SuperLink's database still holds as not finished (the SuperLink or
        deploy-local was stopped during them), so that no earlier ServerApp takes up the run directory
        beside the one about to be submitted; returns their ids."""
        runs = _json_tail(self.flwr("list", CONNECTION, "--format", "json")).get("runs", [])
        stale = [int(run["run-id"]) for run in runs if not str(run.get("status", "")).startswith("finished")]
        for run_id in stale:
            _json_tail(self.flwr("stop", str(run_id), CONNECTION, "--format", "json"))  # a refusal raises
        return stale

    # ---- the institutions ----------------------------------------------------------
    def start_node(self, name: str, node_config: Mapping[str, Any]) -> Started:
        """The institution's SuperNode: TLS to the SuperLink (checked against the CA), signed with
        its private key, its own loopback Runtime API on TLS too. `state-dir` and `client-name` are
        added to `node_config`."""
        inst = self.institutions[name]
        config = {"client-name": name, "state-dir": str(inst.state_dir), **node_config}
        write_private(inst.node_config, tomli_w.dumps(config))
        tls = inst.directory / "runtime-tls"
        secret = kept_secret(inst.superexec_secret)
        argv = [tool("flower-supernode"),
                "--superlink", f"{HOST}:{self.port}",
                "--root-certificates", str(inst.directory / "ca.crt"),
                "--auth-supernode-private-key", str(inst.private_key),
                "--node-config", str(inst.node_config),
                "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                "--host", HOST, "--port", str(inst.runtime_port),
                "--ssl-certfile", str(tls / "server.crt"), "--ssl-keyfile", str(tls / "server.key"),
                "--ssl-ca-certfile", str(tls / "ca.crt")]
        # All institutions share this machine and train at the same time: each gets its share of the
        # cores. With more OpenMP threads than cores, torch's threads spin-wait on each other, and a
        # round took over 10x the CPU time here.
        threads = max(1, (os.cpu_count() or 1) // len(self.institutions))
        env = self.env(inst.directory / "flwr-home", threads)
        started = self.processes.start(name, argv, env, cwd=inst.directory)
        self._start_superexec(name, inst.runtime_port, tls / "ca.crt", secret, started, env, inst.directory)
        return started

    # ---- the run -------------------------------------------------------------------
    def submit(self, run_config: Mapping[str, Any], label: str = "run") -> int:
        """`flwr run` the app with these run-config values; returns the run id."""
        path = self.coordinator / f"{label}-config.toml"
        write_text_atomic(path, tomli_w.dumps(dict(run_config)))
        out = self.flwr("run", str(self.app), CONNECTION, "--run-config", str(path), "--format", "json")
        return int(_json_tail(out)["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as the SuperLink reports it, e.g. `running` or `finished:completed`."""
        out = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
        return str(_json_tail(out)["runs"][0]["status"])

    def follow(self, run_id: int, timeout_s: float, echo: Callable[[str], None] | None = None,
               poll_s: float = 0.5) -> str:
        """Stream the run's log (`flwr log --stream`) until the run finishes; returns its final
        status. Lines go to `echo` as they arrive. A SuperNode that stops does not end the wait
        (the run goes on without it); the SuperLink stopping does."""
        name = f"log-{run_id}"
        stream = self.processes.start(name, [tool("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                      self.env(self.coordinator / "cli-home"), cwd=self.coordinator)
        deadline, offset, status, last_check = time.monotonic() + timeout_s, 0, "running", 0.0
        try:
            while time.monotonic() < deadline:
                offset = _echo_new(stream.log, offset, echo)
                self._require_superlink(wait_s=0.0)
                stream_done = not stream.running()
                if stream_done or time.monotonic() - last_check > 30:
                    try:
                        status, last_check = self.status(run_id), time.monotonic()
                    except DeployError:
                        self._require_superlink(wait_s=5.0)  # a crash: say so, not that `flwr` failed
                        raise
                    if status.startswith("finished"):
                        _echo_new(stream.log, offset, echo)
                        return status
                time.sleep(poll_s if not stream_done else 5.0)  # each status check is a `flwr` process
        finally:
            self.processes.stop([name], grace_s=2.0)
        raise DeployError(f"Run {run_id} did not finish within {timeout_s:.0f} s (last status: {status}).")

    def _require_superlink(self, wait_s: float) -> None:
        """Raise DeployError if the SuperLink process has stopped (or stops within `wait_s`)."""
        superlink = self.processes.started[SUPERLINK]
        if wait_s:
            try:
                superlink.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                return
        if not superlink.running():
            raise DeployError(f"The SuperLink stopped during the run (see {superlink.log}):\n{superlink.log_tail()}")


def superexec_name(owner: str) -> str:
    return f"{owner}-superexec"


def private_dir(path: Path, exist_ok: bool = True) -> Path:
    """A directory only its owner can enter (0700), parents made as usual. What Flower creates in it
    later with its own mode (superlink.db) is then out of other users' reach too."""
    path.mkdir(parents=True, exist_ok=exist_ok)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (0600) from the moment it exists, atomically:
    an institution's node config is its privacy policy, and a crash while rewriting it in place (every
    start, `--resume` included) left an empty file that reads as no limits at all."""
    write_text_atomic(path, text)  # mkstemp makes the temporary file 0600, and the rename keeps its mode


def write_secret(path: Path) -> Path:
    """A new random SuperExec secret, readable by its owner only, written whole or not at all."""
    write_bytes_atomic(path, secrets.token_bytes(SECRET_BYTES))
    return path


def kept_secret(path: Path) -> Path:
    """The machine's SuperExec secret: the one it has (a restarted or reopened deployment), or a new one
    in place of a missing or cut-short file."""
    return path if path.is_file() and path.stat().st_size == SECRET_BYTES else write_secret(path)


def _echo_new(log: Path, offset: int, echo: Callable[[str], None] | None) -> int:
    """Pass the complete lines written to `log` since `offset` to `echo`; returns the new offset."""
    if echo is None or not log.is_file():
        return offset
    with log.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[:data.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        echo(line)
    return offset + len(complete)


def _json_tail(out: str) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command prints (after any plain-text notes)."""
    start = out.find("{")
    if start < 0:
        raise DeployError(f"Expected JSON from flwr, got: {out.strip()[-500:]}")
    data = json.loads(out[start:])
    if not data.get("success", True):
        raise DeployError(f"flwr reported a failure: {data.get('error-message', data)}")
    return data
