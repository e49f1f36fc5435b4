"""A worker runs torch on the CPUs it was given (client/app.py::threads_as_assigned): the local Ray's
idle workers import torch before Ray sets OMP_NUM_THREADS for their actor (simulation/engine.py)."""

from __future__ import annotations

import torch

from fedtune.client import app
from fedtune.config import FedtuneConfig


class _Task:
    def build_model(self, *args):
        return "model"


def test_the_first_model_a_worker_builds_resizes_torch_to_omp_num_threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(app, "get_task", lambda name: _Task())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(2)  # as torch sizes itself on two cores before the actor starts
        cfg = FedtuneConfig()
        assert app._cached_model(cfg, cfg.lora.r) == "model"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_without_omp_num_threads_torch_is_left_as_it_is(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        app.threads_as_assigned()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
