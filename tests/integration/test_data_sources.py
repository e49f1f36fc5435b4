"""A tiny federation on a user's own CSV, partitioned by its institution column, through the command."""

from __future__ import annotations

import csv
import json
import tomllib

import pytest

from tests.integration.test_simulate import fedtune

pytestmark = pytest.mark.integration

TINY = """
rounds = 1
clients = 2
[lora]
r = 4
[train]
batch_size = 16
local_epochs = 1
[model]
max_length = 32
[data]
test_fraction = 0.2
"""

WORDS = {"good": ("great, \"solid\" results", "profits rose"), "bad": ("losses widened", "a weak quarter"),
         "flat": ("unchanged guidance", "steady as expected")}


def test_own_csv_runs_with_its_labels_partition_and_summary(tmp_path, tiny_classifier):
    data = tmp_path / "reports.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["report", "sentiment", "hospital_id"])
        for i in range(120):
            label = ("good", "bad", "flat")[i % 3]
            writer.writerow([f"Café {i}: {WORDS[label][i % 2]}", label, ("north", "south")[i % 2]])
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out), "--no-dp",
                     "--data", str(data), "--text-column", "report", "--label-column", "sentiment",
                     "--partition", "column", "--partition-column", "hospital_id", "--model", str(tiny_classifier),
                     timeout=900)  # the tiny classifier: what is checked is the data path, not learning
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "partition column (column=hospital_id) over 2 clients" in result.stderr

    labels = ["bad", "flat", "good"]
    config = tomllib.loads((out / "config.toml").read_text())["data"]
    assert config["labels"] == labels and config["path"] == str(data.resolve())
    assert json.loads((out / "labels.json").read_text())["labels"] == labels
    summary = json.loads((out / "partition_summary.json").read_text())
    assert [c["hospital_id"] for c in summary["clients"]] == ["north", "south"]
    assert sum(c["examples"] for c in summary["clients"]) + summary["server_test"]["examples"] == 120
    assert (out / "partition.png").stat().st_size > 1000

    import torch

    arrays = torch.load(out / "checkpoints" / "round_0001.pt", weights_only=True)["arrays"]
    heads = [t for name, t in arrays.items() if "classifier" in name and name.endswith("weight")]
    assert heads and all(t.shape[0] == len(labels) for t in heads)  # the data's 3 labels, not the demo's 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[-1]["num_clients"] == 2
