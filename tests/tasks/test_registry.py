"""The task seam: one registry names the tasks; everything else asks it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fedtune
from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.errors import ConfigError
from fedtune.tasks.base import Task, get_task
from fedtune.tasks.registry import TASKS

PACKAGE = Path(fedtune.__file__).parent


def test_no_module_outside_the_registry_tests_a_task_name():
    """A task's name, quoted, appears only in tasks/registry.py: the rest of fedtune asks the task."""
    for name in TASKS:
        quoted = re.compile(rf"""["']{re.escape(name)}["']""")
        found = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if quoted.search(path.read_text(encoding="utf-8"))]
        assert found == ["tasks/registry.py"], name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_implements_the_whole_interface(name):
    task = get_task(name)
    assert isinstance(task, Task)  # an abstract method left out would fail at the module's TASK = ...()


def test_an_unknown_task_names_the_ones_there_are():
    with pytest.raises(ConfigError, match="model.task.*classification.*causal-lm"):
        ModelConfig(task="token-classification")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_splits_its_demo_into_the_clients_and_tokenizes_it(name):
    cfg = FedtuneConfig(clients=3, model=ModelConfig(task=name), data=DataConfig(demo_examples=60))
    task = get_task(name)
    fed = task.federation(cfg.data, cfg.clients, cfg.seed)
    assert len(fed.clients) == 3
    held = sorted([*fed.server_test, *(i for split in fed.clients for i in (*split.train, *split.val))])
    assert held == list(range(60))  # every record in exactly one place
    train = task.tokenize(task.tokenizer(cfg.model), fed.select(fed.clients[0].train), cfg.model.max_length)
    assert len(train) == len(fed.clients[0].train) > 0
