"""Issue #21's comparison: what does protecting a *person* rather than a record cost, and what does
record-level DP say about a person? (not a test)

None of the shared data sets names the person a record is about (their columns are text and label
only), so the grouping here is synthetic, and says so in its output: the training records of a
real data set are dealt to users whose record counts follow a heavy tail (most users hold one or
two records, a few hold dozens; GROUPING), as patients' notes or customers' transactions do. The
scored records are users of one record each, held out whole by the server.

Rows, each `fedtune simulate` on the same CSV, the same users and the same 4 institutions (Dirichlet
alpha = 0.5 over users, each user's records at one institution), seed by seed:
  fed               DP off: the ceiling
  record-dp8        DP-SGD at target ε = 8 per institution, unit record
  user-dp8          user-level DP-SGD at target ε = 8, dp.user_gradient = mean
  user-dp8-clipped  user-level DP-SGD at target ε = 8, dp.user_gradient = clipped_mean
Every DP row gets fedtune's private recipe for what the row does not set, as `fedtune simulate` does.

Beside the accuracies it reports the bound each row gives a user with k records: ε = 8 for the
user rows whatever k; for record-level DP, group privacy's (kε, k·e^((k-1)ε)·δ) for k = 2, 5 and
the largest user (Dwork & Roth 2014, Theorem 2.2 with its δ term), which is vacuous past k = 1 at ε = 8.

Splits as bench/utility.py cuts them (validation mode scores on its `val` split and trains on
`train`). Writes bench/results/user_level.json and prints a table.

    python bench/user_level.py [--datasets phrasebank medical banking77] [--seeds 0] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

from phrasebank import RESULTS
from rich.console import Console
from rich.table import Table
from strategies import run_all
from utility import DATASETS, QUICK, mode_split, score, splits, summarize

from fedtune.config import FedtuneConfig
from fedtune.data.federated import federated_data, sort_labels
from fedtune.data.partition import holdout_split
from fedtune.server.prepare import resolve

CLIENTS, ALPHA, TARGET, DELTA = 4, 0.5, 8.0, 1e-5
GROUPING = {"pareto_shape": 1.1, "max_records": 60, "seed": 7}  # records per user: min(int(Pareto(1.1)), 60)
ROWS = {
    "fed": {"dp.enabled": False},
    "record-dp8": {"dp.enabled": True, "dp.target_epsilon": TARGET, "dp.unit": "record"},
    "user-dp8": {"dp.enabled": True, "dp.target_epsilon": TARGET, "dp.unit": "user", "dp.user_gradient": "mean"},
    "user-dp8-clipped": {"dp.enabled": True, "dp.target_epsilon": TARGET, "dp.unit": "user",
                         "dp.user_gradient": "clipped_mean"},
}
Records = list[tuple[str, str]]


def deal_to_users(count: int) -> list[int]:
    """A user index for each of `count` training records: heavy-tailed record counts per user."""
    rng, owners, user = random.Random(GROUPING["seed"]), [], 0
    while len(owners) < count:
        size = min(int(rng.paretovariate(GROUPING["pareto_shape"])), GROUPING["max_records"])
        owners += [user] * size
        user += 1
    owners = owners[:count]
    rng.shuffle(owners)
    return owners


def write_user_csv(path: Path, train: Records, scored: Records, seed: int) -> tuple[float, dict]:
    """Write (patient_id, text, label) rows so that fedtune's hold-out of users for `seed` is exactly the
    scored records, each its own user; returns (data.test_fraction, the grouping's statistics)."""
    owners = deal_to_users(len(train))
    train_users = max(owners) + 1
    total = train_users + len(scored)
    fraction = len(scored) / total
    pool, held = holdout_split(total, fraction, seed)  # positions in the sorted list of user ids
    if len(held) != len(scored):
        raise SystemExit(f"holdout_split holds out {len(held)} of {total} users, not {len(scored)}.")
    rows = [(f"u{held[i]:06d}", text, label) for i, (text, label) in enumerate(scored)]
    rows += [(f"u{pool[owner]:06d}", text, label) for owner, (text, label) in zip(owners, train, strict=True)]
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "text", "label"])
        writer.writerows(rows)
    sizes = sorted(Counter(owners).values())
    stats = {"train_users": train_users, "train_records": len(train), "largest_user": sizes[-1],
             "median_records": sizes[len(sizes) // 2], "users_with_10_or_more": sum(s >= 10 for s in sizes),
             "records_of_users_with_10_or_more": sum(s for s in sizes if s >= 10)}
    return fraction, stats


def run_config(row: str, path: Path, fraction: float, labels: tuple[str, ...], seed: int, quick: bool,
               scored: Records) -> FedtuneConfig:
    """The row's config, resolved as `fedtune simulate` resolves it; checks that fedtune's hold-out
    of users is exactly the scored records."""
    overrides = {**ROWS[row], "seed": seed, "clients": CLIENTS, "data.partition": "dirichlet", "data.alpha": ALPHA,
                 "data.path": str(path), "data.format": "csv", "data.text_column": "text", "data.label_column": "label",
                 "data.user_column": "patient_id", "data.test_fraction": fraction, "data.labels": list(labels),
                 "dp.delta": DELTA}
    if quick:
        overrides.update({"rounds": QUICK["rounds"], "model.max_length": QUICK["max_length"]})
    cfg = resolve(FedtuneConfig().with_overrides(overrides), frozenset(overrides))
    fed = federated_data(cfg.data, cfg.clients, cfg.seed)
    names = {label: i for i, label in enumerate(fed.label_names)}
    held = sorted(zip(*fed.select(fed.server_test), strict=True))
    if held != sorted((text, names[label]) for text, label in scored):
        raise SystemExit(f"fedtune's server hold-out for {path} is not the scored split.")
    return cfg


def group_privacy(epsilon: float, delta: float, k: int) -> dict:
    """What record-level (ε, δ)-DP says about a user with k records: (kε, k·e^((k-1)ε)·δ); a δ of 1 or
    more says nothing (written as 1)."""
    return {"k": k, "epsilon": k * epsilon, "delta": min(k * math.exp(min((k - 1) * epsilon, 700)) * delta, 1.0)}


def run_dataset(name: str, args: argparse.Namespace, runs: Path, console: Console) -> dict:
    parts = splits(name)
    train, scored = mode_split(parts, "validation", args.quick)
    labels = sort_labels({label for _, label in parts["train"] + parts["val"]})
    jobs, grouping = {}, {}
    for seed in args.seeds:
        path = runs / f"{name}_users_s{seed}.csv"
        fraction, grouping = write_user_csv(path, train, scored, seed)
        for row in args.rows:
            jobs[f"{name}/s{seed}/{row}"] = run_config(row, path, fraction, labels, seed, args.quick, scored)
    results = {key: score(result) for key, result in run_all(jobs, runs, 1, console).items()}
    rows = {}
    for row in args.rows:
        runs_of_row = [results[f"{name}/s{s}/{row}"] for s in args.seeds]
        first = jobs[f"{name}/s{args.seeds[0]}/{row}"]
        rows[row] = {**summarize(runs_of_row), "unit": first.dp.unit if first.dp.enabled else None,
                     "rounds": first.rounds, "chosen": list(first.recipe.chosen)}
        if row == "record-dp8":
            eps = rows[row]["epsilon_max"]
            rows[row]["user_bound"] = [group_privacy(eps, DELTA, k) for k in (1, 2, 5, grouping["largest_user"])]
        elif row.startswith("user"):
            rows[row]["user_bound"] = [{"k": "any", "epsilon": rows[row]["epsilon_max"], "delta": DELTA}]
    majority = Counter(label for _, label in scored).most_common(1)[0][1] / len(scored)
    return {"grouping": {**grouping, "synthetic": True, **GROUPING}, "scored": len(scored),
            "majority_accuracy": majority, "rows": rows, "runs": results}


def show(report: dict, console: Console) -> None:
    for name, data in report["datasets"].items():
        g = data["grouping"]
        table = Table(title=f"{name}: {g['train_records']} training records of {g['train_users']} synthetic users "
                            f"(largest {g['largest_user']}), {CLIENTS} institutions; validation accuracy")
        for column in ("row", "unit", "final", "best", "ε per unit", "what a user with k records gets"):
            table.add_column(column)
        for row, r in data["rows"].items():
            bound = "; ".join(f"k={b['k']}: ε={b['epsilon']:.3g}, " + (f"δ={b['delta']:.2g}" if b["delta"] < 1 else
                                                                        "δ≥1: nothing")
                              for b in r.get("user_bound", []))
            table.add_row(row, r["unit"] or "-", f"{r['final']['mean']:.3f} ± {r['final']['std']:.3f}",
                          f"{r['best']['mean']:.3f}", f"{r.get('epsilon_max', math.inf):.2f}", bound or "none")
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["phrasebank"])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--quick", action="store_true", help="Smoke size (bench/utility.py's --quick sizes).")
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)
    with tempfile.TemporaryDirectory() as tmp:
        runs = (args.runs_dir or Path(tmp)).resolve()
        runs.mkdir(parents=True, exist_ok=True)
        datasets = {name: run_dataset(name, args, runs, console) for name in args.datasets}
    report = {"benchmark": "user_level", "quick": args.quick, "seeds": args.seeds, "clients": CLIENTS,
              "alpha": ALPHA, "target_epsilon": TARGET, "delta": DELTA, "datasets": datasets}
    show(report, console)
    stem = "user_level_quick" if args.quick else "user_level"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"Wrote {args.results / stem}.json")


if __name__ == "__main__":
    main()
