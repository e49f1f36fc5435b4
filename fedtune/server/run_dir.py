"""The run directory: the resolved config, per-round metrics, the privacy ledger, the PEFT
adapter and a checkpoint per round.

A round is committed by writing its checkpoint (atomically); metrics.jsonl is a view rewritten
from the checkpoint's contents right after, so a crash at any point leaves a directory that
`fedtune simulate --resume` continues from the last whole round. The privacy ledger is written
by the round loop as clients report spending (PrivacyLedger.save), before the round is committed.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune import __version__
from fedtune import constants as k
from fedtune.config import RUN_CONFIG, FedtuneConfig, dump_config, read_run_config
from fedtune.durable import strict_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.ledger import PrivacyLedger, epsilon_for_json
from fedtune.server.schedule import kept_round, last_round

CONFIG = RUN_CONFIG
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
CLIENT_STATE = "client_state"
RUN_ID = k.RUN_ID_FILE
ENGINE = "engine"  # which command made the run: its clients' names and state directories are that command's
SIMULATE, DEPLOY_LOCAL, FLWR_RUN = "fedtune simulate", "fedtune deploy-local", "flwr run"
# Audited runs (data.canaries > 0) only: each round's updates as the server received them, one file a
# round, {institution: its trainable arrays}, for `fedtune audit --vantage server`.
OBSERVED = "observed_updates"


# The options that shape the adapter or what it means: a resume under other values would load it wrong.
MODEL_OPTIONS = ("model.task", "model.name_or_path", "model.pooling", "lora.r", "lora.alpha", "lora.target_modules",
                 "lora.modules_to_save", "lora.aggregation", "lora.client_ranks")


def model_options(cfg: FedtuneConfig) -> dict[str, Any]:
    flat = cfg.to_flat()
    return {key: flat[key] for key in MODEL_OPTIONS}


@dataclass
class Checkpoint:
    """Everything needed to resume: the global trainable weights and the run's records."""

    round: int
    arrays: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)  # PrivacyLedger.to_dict(), as of this round
    node_names: dict[int, str] = field(default_factory=dict)
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)  # a server optimizer's moments
    node_keys: dict[str, str] = field(default_factory=dict)  # institution -> its pinned key (server/identity.py)
    options: dict[str, Any] = field(default_factory=dict)  # the MODEL_OPTIONS the adapter was built with

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"fedtune_version": __version__, "round": self.round, "arrays": self.arrays,
                    "metrics": self.metrics, "ledger": self.ledger, "node_names": self.node_names,
                    "optimizer_state": self.optimizer_state, "node_keys": self.node_keys, "options": self.options},
                   buffer)
        return buffer.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> Checkpoint:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["round"], data["arrays"], data["metrics"], data["ledger"], data["node_names"],
                   data.get("optimizer_state", {}),  # checkpoints from before server optimizers have none
                   data.get("node_keys", {}), data.get("options", {}))


@dataclass(frozen=True)
class RunDirectory:
    path: Path

    @classmethod
    def create(cls, path: Path, config: FedtuneConfig, engine: str = SIMULATE) -> RunDirectory:
        """A new run directory holding config.toml and the command that makes it (`engine`); refuses to
        reuse a non-empty one."""
        if path.exists() and not path.is_dir():
            raise ConfigError(f"Run directory {path} is a file. Choose another run directory (`out`).")
        if path.exists() and any(path.iterdir()):
            resume = f"; {cls(path).how_to_continue()}" if (path / CONFIG).is_file() else ""
            raise ConfigError(f"Run directory {path} already exists and is not empty. Choose another run "
                              f"directory (`out`){resume}.")
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / ENGINE, engine)
        write_text_atomic(path / RUN_ID, secrets.token_hex(8))
        write_text_atomic(path / CONFIG, dump_config(config))
        return cls(path)

    @property
    def engine(self) -> str:
        """The command that made this run (ENGINE; a directory from before it was kept: deploy-local's
        has its `deployment` folder, any other was fedtune simulate's)."""
        path = self.path / ENGINE
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
        return DEPLOY_LOCAL if (self.path / "deployment").is_dir() else SIMULATE

    @contextmanager
    def served(self) -> Iterator[None]:
        """Hold this run for one server until the block ends: a second server (`--resume` started twice,
        `flwr run` submitted again with the same `out`) would keep its own ledger in memory, and each
        save of it would erase the other's spending from privacy_ledger.json. An advisory lock on the
        directory itself (fcntl.flock; no file is added to the run), which the system drops with the
        process, so a crash never leaves it held."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FedtuneError(f"{self.path} is in use by another fedtune server (it holds a lock on the "
                                   f"directory); let that run end, or stop it, and then {self.how_to_continue()}."
                                   ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def how_to_continue(self) -> str:
        """How this run is continued: only by the command that made it, whose clients hold its spending
        under their names and state directories (another command's clients would start from ε = 0)."""
        if self.engine == SIMULATE:
            return f"continue that run with `fedtune simulate --resume {self.path}`"
        if self.engine == FLWR_RUN:
            return f"continue that run with `flwr run` and the same run config (out = \"{self.path}\")"
        return (f"it was a `{self.engine}` run, whose institutions' privacy state is in {self.path / 'deployment'}: "
                f"continue it with `fedtune deploy-local --resume {self.path}`")

    @classmethod
    def existing(cls, path: Path) -> RunDirectory:
        read_run_config(path)  # a directory without a readable config.toml is no run directory
        return cls(path)

    def config(self) -> FedtuneConfig:
        return read_run_config(self.path)

    @property
    def run_id(self) -> str:
        """This run's own id, made once (written atomically) and kept by every resume. A client files
        its own ledger entries under it, so that the spending it reports late is only this run's,
        never another run's in an institution's state directory (client/state.py::unrecorded)."""
        path = self.path / RUN_ID
        if not path.is_file():
            ledger = self.read_ledger()
            if ledger is not None and ledger.clients and (self.engine != SIMULATE or self._entries_name_a_run()):
                # a new id would disown every client's own entries (a simulation's are here to look at)
                raise ConfigError(
                    f"{path} is missing, but the run has spent budget under the id it held: with a new one every "
                    "client's own entries of this run would belong to another run, and each would refuse to train "
                    "as having lost its state. Restore the file from a backup, or write the id back into it: it is "
                    "the `run` of the clients' own ledger entries (client_state/*.json in a simulation, each "
                    "institution's state-dir in a deployment). A run made before run ids (entries without a `run`) "
                    "may take any id.")
            write_text_atomic(path, secrets.token_hex(8))  # nothing spent, or a simulation from before run ids
        return path.read_text(encoding="utf-8").strip()

    def _entries_name_a_run(self) -> bool:
        """Whether a simulated client's own ledger entries (client_state/) name the run they were spent in."""
        for path in self.client_state_dir.glob("*.json"):
            try:
                entries = json.loads(path.read_text(encoding="utf-8")).get("ledger", [])
            except ValueError:
                return True  # unreadable: assume it does
            if any(isinstance(entry, dict) and entry.get("run") for entry in entries):
                return True
        return False

    @property
    def client_state_dir(self) -> Path:
        return self.path / CLIENT_STATE

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    def checkpoint_path(self, round_: int) -> Path:
        return self.path / CHECKPOINTS / f"round_{round_:04d}.pt"

    def save_observed(self, round_: int, updates: dict[str, dict[str, torch.Tensor]]) -> None:
        """What the server saw of round `round_`: each institution's arrays, written before the round
        commits (a round trained again after a crash rewrites its file)."""
        buffer = io.BytesIO()
        torch.save(updates, buffer)
        (self.path / OBSERVED).mkdir(exist_ok=True)
        write_bytes_atomic(self.path / OBSERVED / f"round_{round_:04d}.pt", buffer.getvalue())

    def observed_rounds(self, upto: int) -> list[int]:
        """The committed rounds 1..upto whose updates the server recorded (save_observed)."""
        return sorted(r for p in (self.path / OBSERVED).glob("round_*.pt")
                      if (r := int(p.stem.removeprefix("round_"))) <= upto)

    def observed(self, round_: int) -> dict[str, dict[str, torch.Tensor]]:
        """{institution: arrays} as the server received them in `round_`."""
        return torch.load(self.path / OBSERVED / f"round_{round_:04d}.pt", map_location="cpu", weights_only=True)

    def check_resumable(self, checkpoint: Checkpoint, cfg: FedtuneConfig, fresh: dict[str, torch.Tensor]) -> None:
        """Refuse, before any round, a config.toml that no longer matches the checkpoint: the options that
        shape the adapter, and the adapter's tensors themselves (names and shapes, against `fresh`,
        the adapter the config builds)."""
        now = model_options(cfg)
        changed = [f"{key} = {checkpoint.options[key]!r} in the checkpoint, {now[key]!r} in {CONFIG}"
                   for key in checkpoint.options if key in now and checkpoint.options[key] != now[key]]
        if not changed and {n: tuple(t.shape) for n, t in checkpoint.arrays.items()} != \
                {n: tuple(t.shape) for n, t in fresh.items()}:
            changed = ["the adapter's tensors (names or shapes) differ from what the config builds"]
        if changed:
            raise ConfigError(f"{self.path / CONFIG} no longer matches round {checkpoint.round}'s checkpoint: "
                              f"{'; '.join(changed)}. Put the checkpoint's values back to resume, or start a new run "
                              "in another directory (`out`). Nothing was trained.")

    def latest_checkpoint(self) -> Checkpoint | None:
        return self.resume_point()[0]

    def newest_checkpoint(self, purpose: str) -> Checkpoint | None:
        """The newest checkpoint, refusing when a newer one is damaged: what a run hands on (`purpose`: an
        export, an audit) must be its last finished round, not silently an earlier one."""
        checkpoint, damaged = self.resume_point()
        if damaged:
            newest = f"round {checkpoint.round}" if checkpoint else "none"
            raise ConfigError(f"{self.path / CHECKPOINTS} has damaged checkpoints: {'; '.join(damaged)}; the newest "
                              f"readable is {newest}, older than the run's last finished round, so {purpose} would "
                              f"use the wrong model. Restore the file, or {self.how_to_continue()} (the damaged rounds "
                              "are trained again), then try again.")
        return checkpoint

    def released(self, last: Checkpoint, cfg: FedtuneConfig) -> Checkpoint:
        """The checkpoint whose adapter the run releases: `last`, or the round a rejected cooldown
        started from (server/schedule.py's kept_round)."""
        kept = kept_round(cfg, last.metrics) if last.metrics else last.round
        return last if kept == last.round else Checkpoint.from_file(self.checkpoint_path(kept))

    def finished(self, start: Checkpoint | None, cfg: FedtuneConfig) -> bool:
        """Whether a run resumed from `start` has nothing left to do: all its rounds are committed, or it
        stopped early (server/schedule.py), and the session that trained them wrote its summary."""
        done = start is not None and start.round >= last_round(cfg, start.metrics)
        return done and (self.path / SUMMARY).exists()

    def resume_point(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest checkpoint that loads, and what is wrong with each newer one (a crash or a full disk
        can leave a damaged file). Falling back is safe for checkpoints: a round after the one resumed
        from is trained again, and what its clients reported spending stays, from privacy_ledger.json."""
        found = sorted((self.path / CHECKPOINTS).glob("round_*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
        damaged = []
        for path in reversed(found):
            try:
                return Checkpoint.from_file(path), damaged
            except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
                damaged.append(f"{path.name} ({type(err).__name__}: {_first_line(err)})")
        if damaged:
            raise ConfigError(f"No checkpoint in {self.path / CHECKPOINTS} can be read: {'; '.join(damaged)}. The "
                              "run cannot be resumed; start a new one in another directory, `out` "
                              "(privacy_ledger.json keeps what its clients spent).")
        return None, damaged

    def read_ledger(self) -> PrivacyLedger | None:
        """privacy_ledger.json (PrivacyLedger.load): None if there is none yet; a damaged one raises
        ConfigError and stops everything, before anything is sent or rewritten."""
        return PrivacyLedger.load(self.path)

    def ledger_to_resume(self, checkpoint: Checkpoint) -> PrivacyLedger:
        """The checkpoint's ledger plus any entries reported after it by a round that never
        finished (marked `interrupted`): the clients spent that budget, so it stays on record."""
        ledger = PrivacyLedger.from_dict(checkpoint.ledger)
        written = self.read_ledger()
        if written is not None:
            ledger.record_interrupted(written, checkpoint.round)
        return ledger

    def commit(self, checkpoint: Checkpoint) -> None:
        """Durably finish a round: the checkpoint, then the metrics view derived from it. The privacy
        ledger is not rewritten here: the round loop saved it, with everything the checkpoint holds,
        before the round could be committed (server/rounds.py), and it can hold more (entries of
        rounds that never finished), which a copy of the checkpoint's would forget."""
        write_bytes_atomic(self.checkpoint_path(checkpoint.round), checkpoint.to_bytes())
        lines = "".join(strict_json({**row, **({"epsilon_max": epsilon_for_json(row["epsilon_max"])}
                                                 if "epsilon_max" in row else {})}) + "\n"
                        for row in checkpoint.metrics)
        write_text_atomic(self.path / METRICS, lines)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / SUMMARY, summary)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else "empty"


def finished_as(last_round: int, rounds: int) -> str:
    """How a finished run ended, for the messages that refuse to resume it."""
    return (f"has finished its {rounds} round{'s' if rounds != 1 else ''}" if last_round >= rounds
            else f"stopped early after round {last_round}")
