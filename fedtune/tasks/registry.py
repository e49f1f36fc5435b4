"""The task registry: the one place that names the tasks, and the module of each.

A task (tasks/base.py) loads and partitions its data, tokenizes it, builds its model and scores it.
The rest of fedtune asks `tasks.base.get_task(cfg.model.task)` and never tests a task's name. A new
task is one module with a `Task` subclass named TASK, and its line here. This module imports
nothing, so config.py can check a name against it without importing torch.
"""

TASKS = {
    "classification": "fedtune.tasks.classification",  # labelled texts -> one label each
    "causal-lm": "fedtune.tasks.causal_lm",  # instruction records or chats -> the answers
}
DEFAULT_TASK = "classification"
