"""The builders cache one model per process and config; a run's round-0 model must still be the
seed's, whatever an earlier run in the same process loaded into that instance."""

from __future__ import annotations

import torch

from fedtune.config import FedtuneConfig
from fedtune.models.adapter import trainable_state
from fedtune.tasks.base import get_task


def test_a_runs_initial_model_is_the_seeds_even_after_another_run_trained_the_cached_instance():
    cfg = FedtuneConfig.from_flat({"lora.r": 2})
    task = get_task(cfg.model.task)
    first = task.initial_model(cfg.model, cfg.lora, cfg.data, cfg.seed)
    seeds = trainable_state(first)
    with torch.no_grad():  # what an earlier run's evaluator leaves: its final global adapter
        for param in first.parameters():
            if param.requires_grad:
                param.add_(1.0)
    second = task.initial_model(cfg.model, cfg.lora, cfg.data, cfg.seed)
    assert second is first  # the same cached instance...
    again = trainable_state(second)
    assert again.keys() == seeds.keys()
    assert all(torch.equal(again[name], seeds[name]) for name in seeds)  # ...with the seed's weights back
