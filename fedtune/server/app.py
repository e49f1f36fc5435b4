"""The ServerApp: open or resume the run directory, run the rounds, export the adapter.

`app` is the Flower App component that `flwr run .` starts (config from Flower's run config);
`server_app(cfg, run)` builds the same app for `fedtune simulate`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedtune import __version__
from fedtune.config import FedtuneConfig
from fedtune.errors import FedtuneError
from fedtune.models.adapter import base_model_bytes, load_record, save_adapter, to_record
from fedtune.privacy.ledger import PrivacyLedger, epsilon_for_json
from fedtune.resources import peak_rss_mb
from fedtune.server.evaluate import GENERATIONS, ServerEvaluator
from fedtune.server.prepare import open_run
from fedtune.server.rounds import RoundInputs, RunStopped, initial_checkpoint, run_rounds
from fedtune.server.run_dir import Checkpoint, RunDirectory, finished_as
from fedtune.server.warm_up import finish_warm_up, start_warm_up
from fedtune.strategies.build import build_strategy

WARM_UP_TIMEOUT_S = 600.0  # only with round_timeout_s = 0 (no limit); otherwise the warm-up waits at most that


def serve(grid: Grid, cfg: FedtuneConfig, run: RunDirectory, console: Console | None = None,
          warm_workers: int = 0, stop: threading.Event | None = None) -> Checkpoint | None:
    """Run (or continue) the federation in `run`; returns the final checkpoint. On the Simulation
    Engine, `warm_workers` workers load the model while the server evaluates round 0. Setting
    `stop` (Ctrl-C) ends it within a poll interval: the rounds committed stay, the one in progress
    is not committed (what its clients reported spending is in the ledger), and None is returned."""
    try:
        with run.served():
            return _serve(grid, cfg, run, console or Console(soft_wrap=True), warm_workers, stop or threading.Event())
    except RunStopped as stopped:
        where = (f"after round {stopped.round}, the last, while asking for spending whose replies never came; "
                 "every round is saved" if stopped.after_last else
                 f"during round {stopped.round}; rounds before it are saved")
        (console or Console(soft_wrap=True)).print(
            f"Stopped {where}; {run.how_to_continue()}.", markup=False,
            highlight=False, soft_wrap=True)
        return None


def _serve(grid: Grid, cfg: FedtuneConfig, run: RunDirectory, console: Console, warm_workers: int,
           stop: threading.Event) -> Checkpoint:
    started = time.monotonic()
    # soft_wrap: off a terminal, rich would break lines at 80 columns, splitting a long run path in the log.
    start, damaged = run.resume_point()
    on_disk = run.read_ledger()  # a damaged ledger stops the run before anything is sent (server/run_dir.py)
    if damaged:
        console.print(f"Skipped damaged checkpoints: {'; '.join(damaged)}. Resuming from round "
                      f"{start.round if start else 0}; spending reported after it stays in the ledger.",
                      markup=False, highlight=False, soft_wrap=True)
    if run.finished(start, cfg):  # keep the summary of the session that trained
        console.print(f"{run.path} {finished_as(start.round, cfg.rounds)}; nothing to resume.")
        return start
    rounds_left = start is None or start.round < cfg.rounds
    warming = start_warm_up(grid, cfg, warm_workers) if warm_workers and rounds_left else set()
    evaluator = ServerEvaluator(cfg, run.path / GENERATIONS)
    resumed = start is not None or on_disk is not None  # an earlier session may have been cut off
    inputs = RoundInputs(cfg, run, evaluator, console, timeout_s=cfg.round_timeout_s or None, stop=stop,
                         resumed=resumed)
    if start is None:
        start = initial_checkpoint(inputs, to_record(inputs.evaluate.model))
        run.commit(start)
        if run.read_ledger() is None:  # the ledger exists from round 0 on; one left by earlier rounds whose
            PrivacyLedger.from_dict(start.ledger).save(run.path)  # checkpoints are gone is kept (ledger_to_resume)
        first = start.metrics[0]
        ppl = f"  ppl={first['eval_perplexity']:.2f}" if "eval_perplexity" in first else ""
        inputs.console.print(f"round 0/{cfg.rounds}  acc={first['eval_accuracy']:.3f}{ppl}  (before training)")
    else:
        run.check_resumable(start, cfg, dict(to_record(inputs.evaluate.model).to_torch_state_dict()))
        inputs.console.print(f"Resuming {run.path} after round {start.round}.")
    waited, failed = (finish_warm_up(grid, warming, cfg.round_timeout_s or WARM_UP_TIMEOUT_S, stop) if warming
                      else (0.0, 0))
    if failed and not (stop and stop.is_set()):  # after Ctrl-C the warm-up was cut short, not failed
        inputs.console.print(f"{failed} of {len(warming)} workers could not load the model ahead of round 1.")
    final = run_rounds(grid, build_strategy(cfg), inputs, start)
    released = run.released(final, cfg)
    if released is not final:
        loss = {row["round"]: row["client_eval_loss"] for row in final.metrics}
        console.print(f"The cooldown left the clients' validation loss at {loss[final.round]:.4f} after round "
                      f"{final.round}, not below round {released.round}'s {loss[released.round]:.4f}: the run "
                      f"releases round {released.round}'s adapter (cooldown_rounds).", markup=False, highlight=False,
                      soft_wrap=True)
    model = inputs.evaluate.model
    load_record(model, ArrayRecord(torch_state_dict=released.arrays))
    save_adapter(model, run.adapter_dir)
    summary = _summary(final, released, base_model_bytes(model), time.monotonic() - started,
                       inputs.worker_peak_rss_mb, waited, failed)
    summary |= {"train_replies_per_ray_node": dict(sorted(inputs.ray_nodes.items())),
                "stopped_early": final.round < cfg.rounds}  # server/schedule.py
    run.write_summary(summary)
    if cfg.simulation.ray_address and inputs.ray_nodes:
        console.print("Training replies per Ray node: "
                      + ", ".join(f"{node}: {count}" for node, count in sorted(inputs.ray_nodes.items())),
                      markup=False, highlight=False, soft_wrap=True)
    if summary["failed_client_rounds"]:
        console.print(f"{summary['failed_client_rounds']} client-rounds failed (reasons in privacy_ledger.json).",
                      markup=False, highlight=False)
    return final


def _summary(final: Checkpoint, released: Checkpoint, base_bytes: int, wall_s: float, worker_peaks: dict[int, float],
             warm_up_wait_s: float, warm_up_failed: int) -> dict:
    """The run's summary.json; the final_eval_* values are those of the adapter released."""
    last, first, kept = final.metrics[-1], final.metrics[0], released.metrics[-1]
    server = peak_rss_mb()
    workers = [mb for pid, mb in worker_peaks.items() if pid != os.getpid()]  # clients in other processes
    return {
        "fedtune_version": __version__,
        "rounds_completed": final.round,
        "adapter_round": released.round,  # the last round, or the round a rejected cooldown started from
        "initial_eval_accuracy": first["eval_accuracy"],
        "final_eval_accuracy": kept["eval_accuracy"],
        "final_eval_loss": kept["eval_loss"],
        **({"initial_eval_perplexity": first["eval_perplexity"], "final_eval_perplexity": kept["eval_perplexity"]}
           if "eval_perplexity" in kept else {}),
        # "inf" once anyone trained without noise; from the ledger, which may have recorded spending after the
        # last round's row (server/rounds.py::_record_unreported)
        "epsilon_max": epsilon_for_json(PrivacyLedger.from_dict(final.ledger).epsilon_max()),
        "failed_client_rounds": sum(row.get("num_failed", 0) for row in final.metrics),
        "client_level_epsilon": (PrivacyLedger.from_dict(final.ledger).client_level or {}).get("epsilon"),  # None: off
        "bytes_up_per_client": last["bytes_up"],
        "base_model_bytes": base_bytes,
        "payload_fraction": last["bytes_up"] / base_bytes,
        "wall_time_s": round(wall_s, 1),
        # Simulation: how long round 1 waited for the workers' start-up after the server's own (server/warm_up.py).
        "warm_up_wait_s": round(warm_up_wait_s, 1),
        "warm_up_failed": warm_up_failed,  # workers whose warm-up replied with an error or not in time
        # Resident memory: the server process plus every client process that reported this session
        # (each one's own peak; an upper bound on what they held at once). Ray's own daemons are not counted.
        "peak_rss_mb": round(server + sum(workers), 1),
        "peak_rss_mb_server": server,
        "peak_rss_mb_client_processes": sorted(workers, reverse=True),
    }


def server_app(cfg: FedtuneConfig, run: RunDirectory, console: Console | None = None, warm_workers: int = 0,
               stop: threading.Event | None = None, done: threading.Event | None = None) -> ServerApp:
    """A ServerApp bound to an already validated config and run directory; `done` is set when it
    returns, whichever way (the simulation waits for it after a Ctrl-C)."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, run, console, warm_workers, stop)
        finally:
            if done is not None:
                done.set()

    return bound


app = ServerApp()


class UserErrorsInOneLine(logging.Filter):
    """Flower logs an exception a ServerApp raises with its traceback, and then its exit code with
    "An unhandled exception occurred in the ServerApp". A FedtuneError is no crash but a user error
    whose message says what to change (an invalid option; every institution refusing the run's
    privacy settings), so this logs it as one line, and the exit code after it as one line too. The
    run still fails (Flower marks it failed; `fedtune deploy-local` reports it and exits 2). Any
    other exception keeps its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FedtuneError):
            record.msg, record.args = "%s: %s", (record.getMessage(), " ".join(str(error).split()))
            record.exc_info = record.exc_text = None
            self.reported = True
        elif self.reported and isinstance(record.msg, str) and record.msg.startswith("Exit Code: "):
            record.msg, record.args = "%s (the ServerApp stopped on the error above)", (record.msg.split("\n", 1)[0],)
            self.reported = False
        return True


def log_user_errors_in_one_line() -> None:
    """Install UserErrorsInOneLine on Flower's logger (once), in the process that runs the ServerApp."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(known, UserErrorsInOneLine) for known in flower.filters):
        flower.addFilter(UserErrorsInOneLine())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: the config comes from [tool.flwr.app.config]."""
    log_user_errors_in_one_line()  # Flower logs what main raises after it has returned
    cfg, given = FedtuneConfig.from_run_config(dict(context.run_config))
    # The label list is fixed here once: clients reading their own files get it from the server.
    cfg, run = open_run(cfg, Path(cfg.out or "runs/flwr-run"), given)
    serve(grid, cfg, run)
