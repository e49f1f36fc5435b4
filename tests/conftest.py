"""Shared fixtures: a tiny config and the (process-cached) default model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Property tests are judged by their examples, not their speed: Hypothesis' default 200 ms deadline
# per example fails a test whose example waits on a loaded machine's disk or first import.
from hypothesis import settings  # noqa: E402

settings.register_profile("fedtune", deadline=None)
settings.load_profile("fedtune")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    import torch

    torch.set_num_threads(1)
    # ...and one core each, inherited by the federations a test starts (fedtune sizes its Ray workers
    # by the CPUs it may use, simulation/engine.py::usable_cpus): two federations at once then run
    # one Ray worker each, not two each on the same two cores.
    _cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if _workers and len(_cores) >= _workers:
        os.sched_setaffinity(0, {_cores[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % len(_cores)]})

from fedtune.config import DataConfig, FedtuneConfig, LoraConfig, TrainConfig  # noqa: E402


def _test_cache() -> None:
    """The partitions that tests make go to a temporary cache, not the user's (fedtune/cache.py);
    the converted default LM is shared through a link to the real cache's models/, since converting
    it takes half a minute. Set before any test, so the fedtune processes they start inherit it."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from fedtune.cache import CACHE_ENV, cache_root

    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fedtune-test-cache-"))
    (tmp / "models").symlink_to(models, target_is_directory=True)
    os.environ[CACHE_ENV] = str(tmp)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)


_test_cache()


# Seconds the slowest test modules took in `make test` (2026-12-07, 2 cores, one core per worker, on a
# machine also running other work). Collection puts them first, longest first, and `make test` runs with
# --no-loadscope-reorder, so pytest-xdist hands the two workers whole modules longest-first as each frees
# up (greedy longest-processing-time scheduling). Otherwise xdist orders modules by their number of tests,
# and these few-test federations came last, one worker running a federation alone while the other idled.
# A stale figure only costs balance, never a test.
MODULE_SECONDS = {
    "tests/integration/test_crash_resume.py": 313, "tests/integration/test_deploy_local.py": 320,
    "tests/integration/test_audit_mutations.py": 273, "tests/integration/test_audit.py": 197,
    "tests/integration/test_simulate.py": 180, "tests/integration/test_deployment.py": 166,
    "tests/integration/test_early_stopping.py": 119, "tests/integration/test_client_dp.py": 115,
    "tests/integration/test_dp_recipe.py": 111, "tests/integration/test_distributed_dp.py": 108,
    "tests/integration/test_strategies.py": 105, "tests/integration/test_causal_lm.py": 92,
    "tests/integration/test_existing_cluster.py": 76, "tests/integration/test_user_level.py": 65,
    "tests/client/test_privacy_gate.py": 63, "tests/integration/test_lora_aggregation.py": 63,
    "tests/simulation/test_ray_cluster.py": 57, "tests/test_recipe.py": 47, "tests/test_cli.py": 40,
    "tests/client/test_train.py": 35, "tests/integration/test_data_sources.py": 34,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.nodeid.split("::")[0], 0))  # stable: in-module order kept


@pytest.fixture
def tiny_cfg() -> FedtuneConfig:
    return FedtuneConfig(
        rounds=2, clients=3, seed=0,
        lora=LoraConfig(r=4),
        train=TrainConfig(batch_size=8, learning_rate=3e-3),
        data=DataConfig(demo_examples=200),
    )


@pytest.fixture
def tiny_model(tiny_cfg):
    """The process-cached PEFT model; its trainable weights are restored after each test."""
    from fedtune.data.demo import LABELS
    from fedtune.models.adapter import load_record, to_record
    from fedtune.models.build import build_model

    model = build_model(tiny_cfg.model, tiny_cfg.lora, num_labels=len(LABELS), seed=0)
    saved = to_record(model)
    yield model
    load_record(model, saved)
    for p in model.parameters():
        p.grad = None


@pytest.fixture
def tokenized(tiny_cfg):
    """Tokenized demo examples: (texts of 64 examples) for quick training checks."""
    from fedtune.data.demo import make_demo_dataset
    from fedtune.data.text import tokenize
    from fedtune.models.build import load_tokenizer

    examples = make_demo_dataset(64, seed=1)
    return tokenize(load_tokenizer(""), [e.text for e in examples], [e.label for e in examples], 64)


@pytest.fixture
def flower_run():
    """Flower stamps new Messages with the run of the current process; pretend to be in run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
