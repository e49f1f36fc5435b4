"""Ctrl-C while Ray starts (a few seconds before any round): the run stops before its first round."""

import signal

import pytest
from rich.console import Console

from fedtune.config import FedtuneConfig
from fedtune.simulation import engine


@pytest.fixture
def ray_start_interrupted(monkeypatch):
    """Ray's start replaced by one that gets a Ctrl-C (SIGINT to this process) half-way; what ran after is
    recorded instead of run."""
    calls = []

    def start_local_ray(cfg):
        signal.raise_signal(signal.SIGINT)  # as a terminal sends it; the handler runs before this returns
        calls.append("ray started")
        return True

    monkeypatch.setattr(engine, "require_ray_token", lambda: None)
    monkeypatch.setattr(engine, "start_local_ray", start_local_ray)
    monkeypatch.setattr(engine, "_leave_ray", lambda: calls.append("ray left"))
    monkeypatch.setattr("fedtune.server.app.server_app", lambda *a, **k: calls.append("server built"))
    monkeypatch.setattr("flwr.simulation.run_simulation", lambda **k: calls.append("simulation ran"))
    return calls


def test_ctrl_c_while_ray_starts_stops_before_any_round_and_leaves_ray(ray_start_interrupted):
    console = Console(record=True, width=200)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        engine.simulate(FedtuneConfig(), run=None, console=console)
    assert ray_start_interrupted == ["ray started", "ray left"], "Ray's start finished, nothing after it ran"
    assert "Stopping" in console.export_text()
    assert signal.getsignal(signal.SIGINT) is before, "the caller's Ctrl-C handler is back"
