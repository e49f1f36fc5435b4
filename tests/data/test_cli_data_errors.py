"""`fedtune simulate --data ...` refuses unusable data with exit status 2 and one clear paragraph,
before any run directory exists (in-process: these stop long before Flower starts)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.cli import cli


def write_csv(path: Path, rows, header=("text", "label", "site")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def good_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "notes.csv", [(f"note {i}", "ab"[i % 2], f"S{i % 3}") for i in range(60)])


def run(*args: str):
    result = CliRunner().invoke(cli, ["simulate", *args])
    return result.exit_code, " ".join((result.stderr or result.output).split())


@pytest.mark.parametrize("make, args, says", [
    (lambda d: d / "missing.csv", [], "missing.csv does not exist"),
    (lambda d: write_csv(d / "e.csv", [("", "a"), ("x", "b")], header=("text", "label")), [],
     "1 line with an empty or missing text in column `text` (line 2)"),
    (lambda d: write_csv(d / "c.csv", [("x", "a")], header=("body", "label")), [],
     "no column `text`. Its columns are: body, label"),
    (lambda d: d / "notes.csv", ["--partition", "column", "--partition-column", "site", "--clients", "4"],
     "Set `clients` to 3"),
    (lambda d: d / "notes.csv", ["--clients", "80"], "80 clients but only"),
    (lambda d: d / "notes.csv", ["--encoding", "klingon"], "data.encoding"),
])
def test_unusable_data_stops_before_the_run_directory(tmp_path, good_csv, make, args, says):
    out = tmp_path / "never"
    code, message = run("--data", str(make(tmp_path)), "--out", str(out), *args)
    assert code == 2, message
    assert says in message
    assert not out.exists()


def test_latin1_file_read_as_utf8_suggests_the_encoding(tmp_path):
    path = tmp_path / "fr.txt"
    path.write_bytes("Le caf\u00e9 est bon@positive\nMauvais@negative\n".encode("latin-1"))
    out = tmp_path / "never"
    code, message = run("--data", str(path), "--separator", "@", "--out", str(out))
    assert code == 2 and "data.encoding (--encoding) to the file's encoding, e.g. latin-1" in message
    assert not out.exists()


def test_a_bad_instruction_file_stops_before_the_run(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{json.dumps({"instruction": "Q?", "response": "A."})}\n{json.dumps({"instruction": "Q?"})}\n')
    out = tmp_path / "never"
    code, message = run("--task", "causal-lm", "--data", str(path), "--out", str(out))
    assert code == 2 and "(line 2)" in message and "`response`" in message, message
    assert not out.exists()
