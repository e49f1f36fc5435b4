"""Which server strategy for federated LoRA? Each one on Financial PhraseBank, DP off and on (not a test).

Data and recipes are bench/phrasebank.py's: 20 clients, Dirichlet alpha=0.5, 20% held out for the
server; without DP its (b) recipe (LoRA r=8, 5 rounds), with DP its (c) recipe (DP-SGD in every
client, each solving for the sigma that spends epsilon = 8 over the planned rounds; 30 rounds).
Only the strategy changes between the rows of a column:
  fedavg                 example-weighted mean
  fedprox                fedavg + proximal term mu = PROX_MU in every client
  fedadam, fedyogi       server Adam / Yogi on the mean update (fedtune's defaults: eta 0.01,
                         beta 0.9 / 0.99, tau 1e-4)
  fedavgm                server momentum (fedtune's defaults: eta 1.0, momentum 0.9)
  fedavg+median          coordinate-wise median of the updates instead of their mean
Every run is `fedtune simulate` in a subprocess, scored on the same server hold-out after every
round. Prints a table (final and best accuracy, ε), writes bench/results/strategies.json and
strategies.png (accuracy per round), and prints as its last line the report as one JSON object.

    python bench/strategies.py [--rounds 5] [--dp-rounds 30] [--strategies fedavg,fedadam] [--dp both]
                               [--jobs 1] [--quick] [--data PATH] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from phrasebank import (  # bench/phrasebank.py: the split, the recipes and the subprocess runner
    CLIENTS,
    SEED,
    TARGET_EPSILON,
    data_config,
    federation,
    finish_fedtune,
    parse_with_data_arguments,
    settings,
    start_fedtune,
)
from rich.console import Console
from rich.table import Table

from fedtune.config import FedtuneConfig

PROX_MU = 0.01
STRATEGIES = {  # row name -> strategy.* overrides
    "fedavg": {"strategy.name": "fedavg"},
    "fedprox": {"strategy.name": "fedprox", "strategy.proximal_mu": PROX_MU},
    "fedadam": {"strategy.name": "fedadam"},
    "fedyogi": {"strategy.name": "fedyogi"},
    "fedavgm": {"strategy.name": "fedavgm"},
    "fedavg+median": {"strategy.name": "fedavg", "strategy.robust": "median"},
}
QUICK = ("fedavg", "fedadam", "fedavg+median")


def configs(data, strategies: list[str], dp: str, rounds: int, dp_rounds: int,
            max_length: int) -> dict[str, FedtuneConfig]:
    """One config per (strategy, DP) cell, keyed `<strategy>` or `<strategy>/dp`."""
    out = {}
    for private in {"off": [False], "on": [True], "both": [False, True]}[dp]:
        base = federation(data, dp_rounds if private else rounds, max_length, private=private)
        for name in strategies:
            out[f"{name}/dp" if private else name] = base.with_overrides(STRATEGIES[name])
    return out


def strategy_settings(cfg: FedtuneConfig) -> dict:
    s = cfg.strategy
    row = {**settings(cfg), "strategy": s.name, "robust": s.robust}
    if s.name == "fedprox":
        row["proximal_mu"] = s.proximal_mu
    if s.name in ("fedadam", "fedyogi", "fedavgm"):
        row["server_learning_rate"] = s.effective_server_learning_rate()
    if s.name == "fedavgm":
        row["server_momentum"] = s.server_momentum
    if s.name in ("fedadam", "fedyogi"):
        row.update(beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    return row


def run_all(jobs: dict[str, FedtuneConfig], runs: Path, parallel: int, console: Console) -> dict[str, dict]:
    """Run the cells, at most `parallel` at a time, in order; each result is phrasebank's row."""
    names = list(jobs)
    started: dict[str, tuple[subprocess.Popen | None, float]] = {}

    def start(name: str) -> None:
        console.print(f"{name}: fedtune simulate, {jobs[name].rounds} rounds ...", style="bold")
        started[name] = (start_fedtune(jobs[name], runs / name.replace("/", "_")), time.monotonic())

    for name in names[:parallel]:
        start(name)
    results = {}
    for i, name in enumerate(names):
        proc, t0 = started[name]
        results[name] = finish_fedtune(proc, jobs[name], runs / name.replace("/", "_"), t0)
        if i + parallel < len(names):
            start(names[i + parallel])
    return results


def show(report: dict, console: Console) -> None:
    table = Table(title=f"Financial PhraseBank (all agree), {CLIENTS} clients, Dirichlet α=0.5: "
                        f"server hold-out accuracy by strategy")
    for column in ("strategy", "DP", "rounds", "final", "best (round)", "ε", "train s", "wall s"):
        table.add_column(column, no_wrap=column == "strategy")
    for key, row in report["rows"].items():
        curve = row["per_round_accuracy"]
        best = max(range(len(curve)), key=curve.__getitem__)
        rounds = row["rounds_completed"]
        table.add_row(row["settings"]["row"], f"ε≤{TARGET_EPSILON:g}" if key.endswith("/dp") else "off",
                      str(rounds), f"{row['accuracy']:.3f}", f"{curve[best]:.3f} ({best})",
                      f"{row['epsilon_max']:.2f}" if "epsilon_max" in row else "",
                      f"{row['train_s']:.0f}", f"{row['wall_s']:.0f}")
    console.print(table)
    for setting, best in report["best_final"].items():
        console.print(f"Highest final accuracy, DP {setting}: {best['row']} ({best['accuracy']:.3f})")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    settings_shown = [s for s in ("off", "on") if any(k.endswith("/dp") == (s == "on") for k in report["rows"])]
    fig, axes = plt.subplots(1, len(settings_shown), figsize=(6.5 * len(settings_shown), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings_shown, strict=True):
        for key, row in report["rows"].items():
            if key.endswith("/dp") != (setting == "on"):
                continue
            accuracy = row["per_round_accuracy"]
            ax.plot(range(len(accuracy)), accuracy, "o-", label=row["settings"]["row"], markersize=3)
        ax.set_title("no DP" if setting == "off" else f"DP-SGD in every client, ε≤{TARGET_EPSILON:g}")
        ax.set_xlabel("round (0 = before training)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("server hold-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Financial PhraseBank, {CLIENTS} clients, Dirichlet α=0.5: strategies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="Rounds without DP [default: 5, as phrasebank (b)].")
    parser.add_argument("--dp-rounds", type=int, default=30,
                        help="Rounds with DP-SGD [default: 30, as phrasebank (c)].")
    parser.add_argument("--strategies", default=None,
                        help=f"Comma-separated rows out of {', '.join(STRATEGIES)} [default: all; with --quick: "
                             f"{', '.join(QUICK)}].")
    parser.add_argument("--dp", choices=("off", "on", "both"), default="both", help="[default: both]")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Runs at a time (each uses Ray workers; contended wall times above 1) [default: 1].")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke check: 2 rounds each, texts cut to 32 tokens, fewer strategies.")
    args = parse_with_data_arguments(parser)
    chosen = args.strategies or ",".join(QUICK if args.quick else STRATEGIES)
    strategies = [s.strip() for s in chosen.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}.")
    rounds, dp_rounds = (2, 2) if args.quick else (args.rounds, args.dp_rounds)
    jobs = configs(data_config(args.data.resolve()), strategies, args.dp, rounds, dp_rounds,
                   32 if args.quick else 64)
    console = Console()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(jobs, (args.runs_dir or Path(tmp)).resolve(), max(args.jobs, 1), console)
    for key, row in results.items():
        row["settings"] = {"row": key.removesuffix("/dp"), **strategy_settings(jobs[key])}
    best_final = {}
    for setting in ("off", "on"):
        cells = {k: r for k, r in results.items() if k.endswith("/dp") == (setting == "on")}
        if cells:
            key = max(cells, key=lambda k: cells[k]["accuracy"])
            best_final[setting] = {"row": cells[key]["settings"]["row"], "accuracy": cells[key]["accuracy"]}
    report = {"benchmark": "strategies", "quick": args.quick, "cpus": os.cpu_count(), "seed": SEED,
              "data": {"path": str(args.data), "clients": CLIENTS, "partition": "dirichlet", "alpha": 0.5},
              "wall_s": round(time.monotonic() - started, 1), "rows": results, "best_final": best_final}
    show(report, console)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "strategies.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, args.results / "strategies.png")
    console.print(f"Wrote {args.results / 'strategies.json'} and {args.results / 'strategies.png'}")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
