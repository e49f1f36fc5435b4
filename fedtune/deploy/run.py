"""`fedtune deploy-local`: check the config, make the run directory, start a SuperLink and one
SuperNode per institution (deploy/local.py), submit the run with `flwr run`, follow it, and stop
every process it started, whatever happens."""

from __future__ import annotations

import math
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fedtune import constants as k
from fedtune.config import FedtuneConfig, given_keys, load_config
from fedtune.deploy.local import DeployError, LocalFederation, app_config_keys, app_dir
from fedtune.deploy.processes import ProcessSet
from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.ledger import read_ledger
from fedtune.privacy.policy import KEYS as POLICY_KEYS
from fedtune.privacy.policy import node_policy

MAX_NODES = 26
DEPLOYMENT = "deployment"  # inside the run directory: every institution's and the coordinator's files
DERIVED = frozenset({"data.labels", "data.source"})  # the ServerApp derives these again from data.path
# Never sent: the private recipe's reasons and advice are prose (commas and all) in the run directory's config.toml,
# and the ServerApp, given the values they explain, finds nothing left to choose.
NOT_SENT = frozenset({"recipe.chosen", "recipe.advice"})
PY_LOGGING_COPY = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(INFO|DEBUG):")


def node_names(count: int) -> list[str]:
    from fedtune.server.audit import institution_name

    return [institution_name(site) for site in range(count)]


def run_config(cfg: FedtuneConfig, declared: set[str]) -> dict[str, Any]:
    """The values `flwr run --run-config` passes: every option the app declares in pyproject.toml.
    An option changed from its default that the app does not declare cannot reach the ServerApp,
    so it is an error rather than silently ignored."""
    flat, defaults = cfg.to_flat(), FedtuneConfig().to_flat()
    lost = sorted(key for key, value in flat.items()
                  if key not in declared and key not in DERIVED | NOT_SENT and value != defaults[key])
    if lost:
        raise ConfigError(f"deploy-local passes options to the ServerApp through Flower's run config, which only "
                          f"knows the keys in pyproject.toml's [tool.flwr.app.config]; {', '.join(lost)} "
                          "is not there. Add it there (with its default value), or leave it at its default.")
    return {key: _run_config_value(key, flat[key]) for key in sorted(declared - NOT_SENT) if key in flat}


def _run_config_value(key: str, value: Any) -> Any:
    """Flower's run config holds no lists: a list of names travels comma-separated, as in pyproject.toml."""
    if not isinstance(value, list):
        return value
    if any("," in item for item in value):
        raise ConfigError(f"`{key}` = {value} cannot travel through Flower's run config, which joins a list with "
                          "commas; rename the entries that contain one.")
    return ",".join(value)


def refusals(run_path: Path) -> str:
    """" No institution trained: ..." naming each one's refusal, when the ledger ends in refusals only."""
    try:
        clients = read_ledger(run_path).clients
    except FedtuneError:
        return ""
    last = {name: entries[-1] for name, entries in clients.items() if entries}
    if not last or any(entry.status != k.STATUS_REFUSED for entry in last.values()):
        return ""
    return " No institution trained: " + "; ".join(f"{name} refused ({entry.reason or 'no reason given'})"
                                                  for name, entry in sorted(last.items())) + "."


def _echo(console: Console, line: str) -> None:
    """A line of the ServerApp's log, with Flower's colours; Python-logging copies of Flower's own
    INFO and DEBUG lines are left to the log file."""
    if not PY_LOGGING_COPY.match(line):
        console.print(Text.from_ansi(line), highlight=False, soft_wrap=True)


# What --node-config may set on every SuperNode (each keeps its own state-dir).
NODE_CONFIG_KEYS = (*(key for key in POLICY_KEYS if key != k.NODE_STATE_DIR), k.NODE_LORA_RANK)


def parse_node_config(items: list[str]) -> dict[str, Any]:
    """`--node-config KEY=VALUE` items as node config values (TOML; a bare word is a string)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise ConfigError(f"Invalid option `--node-config`: {item!r}; give KEY=VALUE, e.g. require-dp=true.")
        if key not in NODE_CONFIG_KEYS:
            raise ConfigError(f"Invalid option `--node-config`: unknown key `{key}`; deploy-local hands every "
                              f"institution one of: {', '.join(NODE_CONFIG_KEYS)}.")
        try:
            parsed[key] = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            parsed[key] = text
    return parsed


def check_timeout(timeout_s: float) -> None:
    """A deployment's time limit must be a positive, finite number of seconds; 0, a negative or `nan`
    would only fail after every process had started and the run was submitted."""
    if not 0 < timeout_s < math.inf:
        raise ConfigError(f"Invalid option `--timeout`: {timeout_s:g} s; give the seconds the run may take, more "
                          "than 0 and finite, e.g. 7200 (2 hours).")


def prepare_run(nodes: int, out: Path | None, config: Path | None, node_config: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[FedtuneConfig, Path]:
    """The resolved config (the file's, then `overrides` by dotted key, one client per node) and the
    run directory to create; raises FedtuneError. The checks that need the data and the model run in
    server/prepare.py's new_run."""
    from fedtune.server.prepare import resolve

    if not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"Invalid option `--nodes`: {nodes}; use 1 to {MAX_NODES} (each is a process on this "
                          "machine; 3 is a good start).")
    cfg = load_config(config, {**(overrides or {}), "clients": nodes})
    node_policy({**(node_config or {}), k.PARTITION_ID: 0}, cfg, "")  # a bad value stops here, naming its key
    target = (out or Path(cfg.out or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    pinned = given_keys(config, {**(overrides or {}), "clients": nodes, "out": str(target)})
    return resolve(cfg.with_overrides({"out": str(target)}), pinned), target


def deploy_local(nodes: int, out: Path | None, config: Path | None, timeout_s: float, console: Console,
                 node_config: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 explain: Callable[[str], str] = str, resume: Path | None = None) -> tuple[Path | None, int]:
    """Run the whole deployment; returns (run directory, exit status). With `resume`, continue that
    deploy-local run instead: the same institutions (keys, state directories, node configs) on the
    same SuperLink database, from its last committed round (`overrides` may only hold `rounds`).
    Every process started is stopped before this returns: on success, on failure and on Ctrl-C.
    `explain` words an error for whoever gave the options (the CLI adds each config key's flag)."""
    from fedtune.server.prepare import continue_run, new_run
    from fedtune.server.run_dir import DEPLOY_LOCAL, finished_as

    run_path: Path | None = None
    try:
        check_timeout(timeout_s)  # before the run directory, the CA and any process
        app, latest = app_dir(), None
        if resume is None:
            cfg, target = prepare_run(nodes, out, config, node_config, overrides)
            values = run_config(cfg, app_config_keys(app))
            run_path = new_run(cfg, target, engine=DEPLOY_LOCAL)[1].path
        else:
            cfg, run = continue_run(resume, (overrides or {}).get("rounds"), engine=DEPLOY_LOCAL)
            run_path, latest = run.path, run.latest_checkpoint()
            if run.finished(latest, cfg):  # nothing to start
                console.print(f"{run_path} {finished_as(latest.round, cfg.rounds)}; nothing to resume.",
                              markup=False, highlight=False, soft_wrap=True)
                return run_path, 0
            values = run_config(cfg, app_config_keys(app))
        names = node_names(cfg.clients)
        with ProcessSet(run_path / DEPLOYMENT / "logs") as processes:
            fed = LocalFederation(run_path / DEPLOYMENT, processes, app)
            if resume is None:
                fed.prepare(names)
                configs = {name: {**(node_config or {}), k.PARTITION_ID: index, k.NUM_PARTITIONS: cfg.clients}
                           for index, name in enumerate(names)}
            else:  # each institution keeps the node config (its own policy) it ran with
                fed.reopen(names)
                configs = {name: fed.saved_node_config(name) for name in names}
            stale: list[int] = []
            # a reopened SuperLink's unfinished runs are stopped before its SuperExec could take one up
            fed.start_superlink(None if resume is None else lambda: stale.extend(fed.stop_unfinished_runs()))
            console.print(f"SuperLink on https://127.0.0.1:{fed.port} (TLS, SuperNode authentication on)",
                          highlight=False)
            if stale:
                console.print(f"Stopped the earlier session's unfinished run {', '.join(map(str, stale))} on the "
                              "SuperLink.", highlight=False, soft_wrap=True)
            ids = fed.register(names, None if latest is None else {name: node for node, name
                                                                   in latest.node_names.items()})
            if resume is not None:
                console.print("Waiting for the SuperLink to let go of the earlier session's SuperNodes (up to a "
                              "minute).", highlight=False)
                fed.wait_nodes(ids, online=False)
            for name in names:
                fed.start_node(name, configs[name])
                console.print(f"{name}: SuperNode {ids[name]}, state in {fed.institutions[name].state_dir}",
                              highlight=False, soft_wrap=True)
            fed.wait_nodes(ids, online=True)
            run_id = fed.submit(values)
            resumed = "" if resume is None else f", resuming after round {latest.round if latest else 0}"
            console.print(f"fedtune: {cfg.clients} institutions, {cfg.rounds} rounds{resumed}, run {run_id} -> "
                          f"{run_path}", highlight=False, soft_wrap=True)
            status = fed.follow(run_id, timeout_s, echo=lambda line: _echo(console, line))
            if status != "finished:completed":
                raise DeployError(f"Run {run_id} ended as {status}.{refusals(run_path)} The ServerApp's log is in "
                                  f"{processes.log_dir}; finished rounds are saved in {run_path}; "
                                  f"`fedtune deploy-local --resume {run_path}` continues the run.")
        console.print(f"Stopped the SuperLink and {cfg.clients} SuperNodes.", highlight=False)
        return run_path, 0
    except KeyboardInterrupt:
        again = f" `fedtune deploy-local --resume {run_path}` continues the run." if run_path else ""
        console.print("Interrupted: stopped the SuperLink and every SuperNode. Finished rounds are saved (`fedtune "
                      f"export` and `fedtune privacy-report` read them).{again}", soft_wrap=True, markup=False,
                      highlight=False)
        return run_path, 130
    except FedtuneError as err:
        console.print(f"[bold red]Error:[/bold red] {escape(explain(str(err)))}", soft_wrap=True)
        return run_path, 2
