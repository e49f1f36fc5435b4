"""Does a round's time follow the clients sampled, or the clients registered? (not a test)

Five `fedtune simulate` runs in this one process, each 2 rounds with DP-SGD on, every client
holding the same 8 demo examples (IID), batch size 4:
  registered 100,    sampled 20 per round
  registered 1,000,  sampled 20 per round    (same work per round as the first: should take as long)
  registered 1,000,  sampled 100 per round   (5x the work: should take about 5x as long)
  registered 100,    sampled 100 per round   (every client, every round)
  registered 10,000, sampled 100 per round   (same work as the one before: target within 1.2x)
The time compared is round 2's `train_s` (configure, train every sampled client, aggregate), when
every worker has its model loaded; round 1 also pays Ray's and the workers' start-up. Peak resident
memory is each run's `peak_rss_mb` from summary.json. Prints a table, then as its last line one
JSON object with `registered_1000_vs_100` (target about 1), `sampled_100_vs_20` (about 5) and
`registered_10000_vs_100` (100 sampled in both; target at most 1.2, at no more than 4 GiB peak RSS).

    python bench/registered_clients.py [RUN_NAME ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from rich.console import Console  # noqa: E402

from fedtune.config import DataConfig, FedtuneConfig, StrategyConfig, TrainConfig  # noqa: E402
from fedtune.server.prepare import preflight  # noqa: E402
from fedtune.server.run_dir import RunDirectory  # noqa: E402
from fedtune.simulation.engine import simulate  # noqa: E402

PER_CLIENT, TEST_FRACTION = 8, 0.05
RUNS = (("registered_100_sampled_20", 100, 20), ("registered_1000_sampled_20", 1000, 20),
        ("registered_1000_sampled_100", 1000, 100), ("registered_100_sampled_100", 100, 100),
        ("registered_10000_sampled_100", 10000, 100))


def workload(registered: int, sampled: int) -> FedtuneConfig:
    examples = round(registered * PER_CLIENT / (1 - TEST_FRACTION)) + 1
    return FedtuneConfig(
        rounds=2, clients=registered, seed=0,
        train=TrainConfig(batch_size=4, local_epochs=1),
        strategy=StrategyConfig(clients_per_round=sampled, fraction_evaluate=0.0),
        data=DataConfig(demo_examples=examples, test_fraction=TEST_FRACTION, client_val_fraction=0.0,
                        partition="iid"),
    )


def run(cfg: FedtuneConfig, out: Path) -> dict:
    preflight(cfg)
    simulate(cfg, RunDirectory.create(out, cfg), Console(stderr=True, quiet=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"round_2_train_s": rows[-1]["train_s"], "round_1_train_s": rows[1]["train_s"],
            "round_2_examples": rows[-1]["train_examples"], "peak_rss_mb": summary["peak_rss_mb"],
            "epsilon_max": summary["epsilon_max"]}


RATIOS = {  # name: (numerator run, denominator run, what to expect)
    "registered_1000_vs_100": ("registered_1000_sampled_20", "registered_100_sampled_20", "target about 1"),
    "sampled_100_vs_20": ("registered_1000_sampled_100", "registered_1000_sampled_20", "work: 5x"),
    "registered_10000_vs_100": ("registered_10000_sampled_100", "registered_100_sampled_100", "target at most 1.2"),
}


def main(names: list[str]) -> None:
    """Runs every workload, or only those named on the command line (the ratios of the pairs run)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, registered, sampled in RUNS:
            if names and name not in names:
                continue
            results[name] = {"registered": registered, "sampled": sampled,
                             **run(workload(registered, sampled), Path(tmp) / name)}
            r = results[name]
            print(f"{name:28s} round 2: {r['round_2_train_s']:6.1f} s for {r['round_2_examples']} examples  "
                  f"(round 1: {r['round_1_train_s']:.1f} s)  peak RSS {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    ratios = {}
    for ratio, (top, bottom, expect) in RATIOS.items():
        if top in results and bottom in results:
            ratios[ratio] = round(results[top]["round_2_train_s"] / results[bottom]["round_2_train_s"], 2)
            print(f"round time {ratio}: {ratios[ratio]}x ({expect})", file=sys.stderr)
    print(json.dumps({**ratios, "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main(sys.argv[1:])
