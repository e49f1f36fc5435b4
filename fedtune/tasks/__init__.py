"""Tasks: what a federation learns, from which records. The one place that knows the tasks by name.

A task (tasks/base.py) loads and partitions its data, tokenizes it, builds its model and scores it.
The rest of fedtune asks `get_task(cfg.model.task)` and never tests a task's name. A new task is
one module with a `Task` subclass named TASK, and its line in TASKS.

The modules are imported on first use, so that config.py can check a name against TASKS without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtune.tasks.base import Task

TASKS = {
    "classification": "fedtune.tasks.classification",  # labelled texts -> one label each
    "causal-lm": "fedtune.tasks.causal_lm",  # instruction records or chats -> the answers
}
DEFAULT_TASK = "classification"


def get_task(name: str) -> Task:
    """The task called `name` (one of TASKS; the config has checked it)."""
    return importlib.import_module(TASKS[name]).TASK
