"""`fedtune export`: a run's released global adapter as a PEFT adapter directory, or merged into its
base model as an ordinary Hugging Face model that needs neither peft nor fedtune to load. A classifier
that pools by the mean (model.pooling = "mean", the private recipe's) is written with that pooling as
Hugging Face custom code (models/pooling.py), so it loads with trust_remote_code=True.

The weights come from the run's last checkpoint (or, after a rejected cooldown, the round it started
from: server/schedule.py), so an interrupted run can be exported too. Each
output is written into a temporary directory beside it, and only when every output is complete are
they renamed into place: a failure leaves none of them behind, nor the parent directories it made.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord

from fedtune.config import RUN_CONFIG
from fedtune.errors import ConfigError
from fedtune.models.adapter import load_record
from fedtune.models.build import tokenizer_pad_id
from fedtune.models.pooling import write_mean_pooling_code
from fedtune.server.run_dir import RunDirectory
from fedtune.tasks.base import get_task


@dataclass(frozen=True)
class Exported:
    round: int  # the round whose global adapter was written; 0 is the untrained start
    rounds: int  # the rounds the run planned
    paths: list[Path]  # what was written, in order


def export_run(run_dir: Path, adapter: Path | None = None, merged: Path | None = None) -> Exported:
    """Write the adapter to `adapter` and/or the merged model to `merged`; says which round and what was written."""
    if adapter is not None and merged is not None:
        _check_apart(adapter, merged)
    run = RunDirectory.existing(run_dir)
    for option, out in (("--adapter", adapter), ("--merged", merged)):
        if out is not None and out.exists():
            raise ConfigError(f"{out} already exists; fedtune export writes a new directory. Pass another path.")
        blocking = next((d for d in (out.absolute().parents if out is not None else ()) if d.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ConfigError(f"{option} {out}: {blocking} is a file, so no directory can be made inside it. Pass "
                              "another path.")
    checkpoint = run.newest_checkpoint("the export")
    if checkpoint is None:
        raise ConfigError(f"{run_dir} has no finished round yet (no checkpoints/round_*.pt), so there is nothing "
                          "to export. Run it first, or continue it with --resume.")
    cfg = run.config()
    checkpoint = run.released(checkpoint, cfg)
    task = get_task(cfg.model.task)
    try:
        task.check_model(cfg.model, cfg.lora)  # the base model the run trained on must still be there
    except ConfigError as err:
        raise ConfigError(f"{err} The run's base model is named in {run.path / RUN_CONFIG}; export needs the same "
                          "model the run trained on.") from None
    model = task.fresh_model(cfg.model, cfg.lora, cfg.data, cfg.seed)  # uncached: merging changes it
    load_record(model, ArrayRecord(torch_state_dict=checkpoint.arrays))
    tokenizer = task.tokenizer(cfg.model)
    staged: list[tuple[Path, Path]] = []  # (staging directory, target), renamed into place at the end
    made = _make_parents([out for out in (adapter, merged) if out is not None])
    exported = False
    try:
        if adapter is not None:
            staged.append((_stage(adapter, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d))),
                           adapter))
        if merged is not None:
            full = model.merge_and_unload()  # LoRA folded into the weights; the last use of `model`

            def write_merged(directory: Path) -> None:
                tokenizer_pad_id(full, tokenizer)
                full.save_pretrained(directory)
                tokenizer.save_pretrained(directory)
                if cfg.model.pooling == "mean":  # no stock classifier pools by the mean: ship its code
                    write_mean_pooling_code(directory, full)

            staged.append((_stage(merged, write_merged), merged))
        _put_in_place(staged)
        exported = True
    finally:
        for staging, _ in staged:
            shutil.rmtree(staging, ignore_errors=True)  # gone already where it was renamed into place
        if not exported:
            _remove_made(made)
    return Exported(checkpoint.round, cfg.rounds, [target for _, target in staged])


def _check_apart(adapter: Path, merged: Path) -> None:
    """Refuse an --adapter and a --merged that are the same directory or one inside the other."""
    a, m = adapter.resolve(), merged.resolve()
    if a == m or a in m.parents or m in a.parents:
        how = "the same directory" if a == m else "one inside the other"
        raise ConfigError(f"--adapter {adapter} and --merged {merged} are {how}; each is written as a new "
                          "directory of its own. Pass two separate paths.")


def _make_parents(targets: list[Path]) -> list[Path]:
    """Create the targets' missing parent directories; returns those it created, innermost first."""
    made: list[Path] = []
    for target in targets:
        missing = [d for d in reversed(target.absolute().parents) if not d.exists()]  # outermost first
        for directory in missing:
            try:
                directory.mkdir()
            except BaseException:
                _remove_made(made)
                raise
            made.insert(0, directory)
    return made


def _remove_made(made: list[Path]) -> None:
    """Remove the directories _make_parents created (innermost first), where they are still empty."""
    for directory in made:
        try:
            directory.rmdir()
        except OSError:  # something else was put there meanwhile: it stays
            pass


def _stage(target: Path, write: Callable[[Path], object]) -> Path:
    """Write `target`'s contents into a new temporary directory beside it, and return that directory."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp (and safetensors) make them private; an export is meant to be shared
        for file in staging.iterdir():
            file.chmod(0o644)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _put_in_place(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staging directory to its target; if one fails, take back those already renamed."""
    done: list[Path] = []
    try:
        for staging, target in staged:
            if target.exists():  # made meanwhile: rename would replace an empty directory without a word
                raise ConfigError(f"{target} already exists; fedtune export writes a new directory. "
                                  "Pass another path.")
            staging.rename(target)
            done.append(target)
    except BaseException:
        for target in done:
            shutil.rmtree(target, ignore_errors=True)
        raise
