"""The ServerApp: open or resume the run directory, run the rounds, export the adapter.

`app` is the Flower App component that `flwr run .` starts (config from Flower's run config);
`server_app(cfg, run)` builds the same app for `fedtune simulate`.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedtune import __version__
from fedtune.config import FedtuneConfig
from fedtune.models.adapter import base_model_bytes, load_record, save_adapter, to_record
from fedtune.server.evaluate import ServerEvaluator
from fedtune.server.rounds import RoundInputs, initial_checkpoint, run_rounds
from fedtune.server.run_dir import CONFIG, Checkpoint, RunDirectory
from fedtune.strategies.build import build_strategy


def serve(grid: Grid, cfg: FedtuneConfig, run: RunDirectory, console: Console | None = None) -> Checkpoint:
    """Run (or continue) the federation in `run`; returns the final checkpoint."""
    started = time.monotonic()
    inputs = RoundInputs(cfg, run, ServerEvaluator(cfg), console or Console())
    start = run.latest_checkpoint()
    if start is None:
        start = initial_checkpoint(inputs, to_record(inputs.evaluate.model))
        run.commit(start)
        inputs.console.print(f"round 0/{cfg.rounds}  acc={start.metrics[0]['eval_accuracy']:.3f}"
                             "  (before training)")
    else:
        inputs.console.print(f"Resuming {run.path} after round {start.round}.")
    final = run_rounds(grid, build_strategy(cfg), inputs, start)
    model = inputs.evaluate.model
    load_record(model, ArrayRecord(torch_state_dict=final.arrays))
    save_adapter(model, run.adapter_dir)
    run.write_summary(_summary(final, base_model_bytes(model), time.monotonic() - started))
    return final


def _summary(final: Checkpoint, base_bytes: int, wall_s: float) -> dict:
    last, first = final.metrics[-1], final.metrics[0]
    return {
        "fedtune_version": __version__,
        "rounds_completed": final.round,
        "initial_eval_accuracy": first["eval_accuracy"],
        "final_eval_accuracy": last["eval_accuracy"],
        "final_eval_loss": last["eval_loss"],
        "epsilon_max": last["epsilon_max"],
        "bytes_up_per_client": last["bytes_up"],
        "base_model_bytes": base_bytes,
        "payload_fraction": last["bytes_up"] / base_bytes,
        "wall_time_s": round(wall_s, 1),
        # ru_maxrss is in KiB on Linux: the server process (simulation workers are separate).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def server_app(cfg: FedtuneConfig, run: RunDirectory, console: Console | None = None) -> ServerApp:
    """A ServerApp bound to an already validated config and run directory."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, run, console)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: the config comes from [tool.flwr.app.config]."""
    cfg = FedtuneConfig.from_flat(dict(context.run_config), source="Flower run config")
    out = Path(cfg.out or "runs/flwr-run")
    run = RunDirectory.existing(out) if (out / CONFIG).is_file() else RunDirectory.create(out, cfg)
    serve(grid, cfg, run)
