"""Atomic writes: a crash leaves either the old file or the new one, never half of one.

The standard library has no atomic write; this is the usual temp-file-then-rename.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def make_dirs_durable(directory: Path) -> None:
    """`directory` and any missing parents, each new one's entry made durable in its parent: a file
    fsynced into a directory whose own entry a power loss can drop is lost with it (POSIX promises
    no order between the two; a client's first state file is the only record of its spending)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _sync_directory(new.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    make_dirs_durable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def write_new_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, whole or not at all: the bytes go to a temp file with
    `mode`, fsynced, which is then hard-linked to `path` (a link, unlike a rename, fails with
    FileExistsError when the name is taken). A crash leaves no cut-short file for the next run to
    refuse or, worse, read."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable: without this a power loss can bring back the old file
    (a ledger that forgot spending). Skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def strict_json(obj: Any, **options: Any) -> str:
    """JSON that strict parsers accept: NaN and ±Infinity (which json.dumps writes by default) become
    null, fedtune's "not a number / unbounded" in every file it writes."""
    return json.dumps(_finite(obj), allow_nan=False, **options)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, strict_json(obj, indent=2, sort_keys=False) + "\n")


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move a fully written `staging` directory to `target`, replacing any old one. A directory cannot
    be renamed over a non-empty one, so the old one is moved aside first; a crash between the two
    renames leaves it aside (`.NAME.old`) and no `target`, and the next call puts it back before
    anything else, so a whole directory is always at `target` or beside it."""
    _sync_tree(staging)  # the files are on disk before the rename makes them the target
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)  # a crash between the two renames below: the old one is the only copy
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _sync_directory(target.parent)
    if old.exists():
        shutil.rmtree(old)


def _sync_tree(directory: Path) -> None:
    """fsync every file under `directory` and every directory in it, itself included."""
    for path in sorted(directory.rglob("*"), reverse=True):  # deepest first: a directory after its entries
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _sync_directory(path)
    _sync_directory(directory)
