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
