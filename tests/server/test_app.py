"""serve() on a run that has nothing left to do."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from fedtune.config import FedtuneConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.app import serve
from fedtune.server.run_dir import Checkpoint, RunDirectory


class NoGrid:
    """A finished run must not talk to any node."""

    def __getattr__(self, name):
        raise AssertionError(f"grid.{name} was used")


def test_resuming_a_finished_run_changes_nothing_in_it(tmp_path):
    """`fedtune audit --resume` on a finished simulate run goes through serve(); the summary must
    stay the one of the session that trained (its wall time, peak memory, warm-up wait)."""
    cfg = FedtuneConfig().with_overrides({"rounds": 2})
    run = RunDirectory.create(tmp_path / "run", cfg)
    rows = [{"round": r, "eval_accuracy": 0.1 * r} for r in range(3)]
    run.commit(Checkpoint(2, {"w": torch.ones(2)}, rows, PrivacyLedger("prv", True).to_dict(), {}))
    run.write_summary({"wall_time_s": 321.0, "peak_rss_mb": 2500.0})
    files = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    out = io.StringIO()
    final = serve(NoGrid(), cfg, run, Console(file=out, width=200))
    assert final.round == 2
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == files
    assert "has finished its 2 rounds; nothing to resume" in out.getvalue()


def test_resuming_a_finished_run_from_the_command_starts_no_simulation(tmp_path, monkeypatch):
    """`fedtune simulate --resume` (and `fedtune audit --resume`) on a finished run: no Ray to start."""
    from typer.testing import CliRunner

    import fedtune.simulation.engine as engine
    from fedtune.cli import cli

    cfg = FedtuneConfig().with_overrides({"rounds": 1})
    run = RunDirectory.create(tmp_path / "run", cfg)
    run.commit(Checkpoint(1, {"w": torch.ones(2)}, [{"round": 0}, {"round": 1}],
                          PrivacyLedger("prv", True).to_dict(), {}))
    run.write_summary({"wall_time_s": 1.0})
    monkeypatch.setattr(engine, "simulate", lambda *args: (_ for _ in ()).throw(AssertionError("simulated")))
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(run.path)])
    assert result.exit_code == 0, result.output
    assert "has finished its 1 round; nothing to resume" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(run.path)


def _serverapp_log(monkeypatch, run_config: dict) -> str:
    """Run `flwr run`'s ServerApp entry point as Flower's flwr-serverapp process does (run_serverapp.py
    in flwr 1.42: log what main raised with exc_info, then the exit code), and return Flower's log."""
    import logging

    from flwr.app import Context, RecordDict
    from flwr.common.logger import log

    from fedtune.server.app import main

    flower = logging.getLogger("flwr")
    monkeypatch.setattr(flower, "filters", [])  # what main installs goes with the test
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    flower.addHandler(handler)
    try:
        try:
            main(NoGrid(), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
        except Exception as ex:
            log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
            log(logging.ERROR, "Exit Code: 201\nAn unhandled exception occurred in the ServerApp.\n\n"
                               "For more information, visit: <https://flower.ai/docs/framework/ref-exit-codes/201.html>")
        else:
            raise AssertionError("the ServerApp should have failed")
    finally:
        flower.removeHandler(handler)
    return stream.getvalue()


def test_a_user_error_in_the_serverapp_is_logged_in_one_line_and_a_crash_with_its_traceback(monkeypatch):
    """`fedtune deploy-local --no-dp --node-config require-dp=true` (every institution refusing) used to
    log the ServerApp's FedtuneError with its full traceback, twice, and Flower's "An unhandled exception"."""
    said = _serverapp_log(monkeypatch, {"rounds": 0})
    assert said.splitlines() == [
        "ServerApp raised an exception: Invalid option `rounds`: use 1 to 100,000 rounds.",
        "Exit Code: 201 (the ServerApp stopped on the error above)"], said

    def crash(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(FedtuneConfig, "from_run_config", crash)
    said = _serverapp_log(monkeypatch, {})
    assert "Traceback (most recent call last)" in said and "RuntimeError: a bug" in said, said
    assert "An unhandled exception occurred in the ServerApp." in said, said
