"""Where fedtune keeps what it can rebuild: the converted default LM and partition index lists.

$FEDTUNE_CACHE, else $XDG_CACHE_HOME/fedtune, else ~/.cache/fedtune. Deleting it costs only the
time to rebuild what it held.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.durable import write_text_atomic

CACHE_ENV = "FEDTUNE_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedtune"


def cached_json(kind: str, key: Any, compute: Callable[[], Any],
                valid: Callable[[Any], bool] = lambda _value: True) -> Any:
    """compute(), stored under a hash of `key` (any JSON value that fixes the result) and read back
    by every later call with the same key, in any process. An entry that cannot be read, or that
    `valid` refuses (say, edited by hand), is rebuilt."""
    digest = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()
    path = cache_root() / kind / f"{digest[:32]}.json"
    try:
        value = json.loads(path.read_text())
        if valid(value):
            return value
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        write_text_atomic(path, json.dumps(value, separators=(",", ":")))
    except OSError:
        pass  # a read-only or full cache only costs the next process the same computation
    return value
