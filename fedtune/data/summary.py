"""What each simulated client holds: examples, labels per client, texts that will be truncated.

Printed before a run (compactly: a table for a few clients, a digest for many), and saved with it
as `partition_summary.json`, `labels.json` and a stacked bar chart, `partition.png`.
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedtune.config import DataConfig
from fedtune.data.loaders import listed
from fedtune.data.partition import ClientSplit
from fedtune.durable import write_bytes_atomic, write_json_atomic

SUMMARY_FILE = "partition_summary.json"
LABELS_FILE = "labels.json"
PLOT_FILE = "partition.png"
TABLE_ROWS = 12  # more clients than this are summarized, not listed
TICKS = 40  # client names under the bars up to this many clients


class Partitioned(Protocol):
    """What the summary reads of a task's federation: a group per record (a classifier's label id,
    the demo's urgency for instructions), the hold-out and the client splits."""

    groups: tuple[int, ...]
    group_names: tuple[str, ...]
    server_test: tuple[int, ...]
    clients: tuple[ClientSplit, ...]
    client_ids: tuple[str, ...]  # partition `column`: each client's value of data.partition_column
    skipped: tuple[str, ...]
    notes: tuple[str, ...]  # warnings about the values read
    users: tuple[str, ...]  # data.user_column: whose record each is; empty when not set


def partition_summary(fed: Partitioned, data: DataConfig, lengths: Sequence[int], max_length: int) -> dict[str, Any]:
    """Examples, group (label) histogram and truncated texts for the server hold-out and every client."""
    names = fed.group_names

    def describe(indices: Sequence[int]) -> dict[str, Any]:
        counts = Counter(fed.groups[i] for i in indices)
        return {"examples": len(indices), "labels": {name: counts.get(i, 0) for i, name in enumerate(names)},
                "truncated": sum(lengths[i] > max_length for i in indices)}

    clients = []
    for cid, split in enumerate(fed.clients):
        row = {"client": f"client-{cid:04d}", **describe((*split.train, *split.val)),
               "train": len(split.train), "val": len(split.val)}
        if fed.client_ids:
            row[data.partition_column] = fed.client_ids[cid]
        if fed.users:  # n of user-level accounting: the users each client trains on
            row["train_users"] = len({fed.users[i] for i in split.train})
            row["val_users"] = len({fed.users[i] for i in split.val})
        clients.append(row)
    method = {"dirichlet": {"alpha": data.alpha}, "shard": {"shards_per_client": data.shards_per_client},
              "column": {"column": data.partition_column}}.get(data.partition, {})
    return {
        "source": data.path or "demo",
        "labels": list(names),
        "partition": {"method": data.partition, **method},
        "examples": len(fed.groups),
        "skipped": list(fed.skipped),
        "notes": list(fed.notes),
        "max_length": max_length,
        "truncated": sum(n > max_length for n in lengths),
        "longest_tokens": max(lengths, default=0),
        "server_test": describe(fed.server_test),
        "clients": clients,
        **({"user_column": data.user_column, "users": len(set(fed.users)),
            "most_records_per_user": _most_records(fed)} if fed.users else {}),
    }


def _most_records(fed: Partitioned) -> int:
    """The most records any user has, counting every place a record is used (a repeated audit
    canary is in its client's training data several times)."""
    placed = [*fed.server_test, *(i for split in fed.clients for i in (*split.train, *split.val))]
    return max(Counter(fed.users[i] for i in placed).values())


def summary_lines(summary: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(lines, warnings) to print: a table for a few clients, a digest for many."""
    names, clients = summary["labels"], summary["clients"]
    method = summary["partition"]
    detail = ", ".join(f"{key}={value}" for key, value in method.items() if key != "method")
    lines = [f"data: {summary['examples']} examples from {summary['source']}, {len(names)} labels "
             f"({listed(names, 8)}); server hold-out {summary['server_test']['examples']}",
             f"partition {method['method']}{f' ({detail})' if detail else ''} over {len(clients)} clients:"]
    if "users" in summary:
        lines.insert(1, f"users: {summary['users']} in column `{summary['user_column']}`, each one's records at one "
                        f"client (at most {summary['most_records_per_user']} records a user)")
        if summary.get("users_above_k"):
            lines.insert(2, f"  {summary['users_above_k']} training users have more than dp.max_records_per_user = "
                            f"{summary['max_records_per_user']} records: each step uses a random "
                            f"{summary['max_records_per_user']} of theirs ({summary['records_above_k']} of their "
                            "records are beyond that k)")
    if len(clients) <= TABLE_ROWS and "users" in summary:
        width = max(len(c["client"]) for c in clients)
        lines.append(f"  {'client'.ljust(width)}  train  users    val  {'/'.join(names)}")
        for c in clients:
            counts = "/".join(str(n) for n in c["labels"].values())
            lines.append(f"  {c['client'].ljust(width)}  {c['train']:5d}  {c['train_users']:5d}  {c['val']:5d}  "
                         f"{counts}")
    elif len(clients) <= TABLE_ROWS:
        width = max(len(c["client"]) for c in clients)
        lines.append(f"  {'client'.ljust(width)}  train    val  {'/'.join(names)}")
        for c in clients:
            counts = "/".join(str(n) for n in c["labels"].values())
            lines.append(f"  {c['client'].ljust(width)}  {c['train']:5d}  {c['val']:5d}  {counts}")
    else:
        sizes = [c["examples"] for c in clients]
        shares = [max(c["labels"].values()) / c["examples"] for c in clients]
        labels_held = [sum(n > 0 for n in c["labels"].values()) for c in clients]
        lines.append(f"  examples per client: min {min(sizes)}, median {statistics.median(sizes):g}, max {max(sizes)}")
        lines.append(f"  labels per client: min {min(labels_held)}, median {statistics.median(labels_held):g}; "
                     f"largest label's share: median {statistics.median(shares):.2f}, max {max(shares):.2f}")
        lines.append(f"  per-client counts: {SUMMARY_FILE} and {PLOT_FILE} in the run directory")
    warnings = [f"left out invalid records (data.skip_invalid_rows): {item}" for item in summary["skipped"]]
    warnings += summary.get("notes", [])
    if summary["truncated"]:
        share = summary["truncated"] / summary["examples"]
        warnings.append(f"{summary['truncated']} of {summary['examples']} texts ({share:.1%}) are longer than "
                        f"model.max_length={summary['max_length']} tokens (the longest has "
                        f"{summary['longest_tokens']}) and will be truncated; raise model.max_length to keep more.")
    return lines, warnings


def plot_partition(summary: dict[str, Any]) -> bytes:
    """PNG of a stacked bar chart: one bar per client, one colour per label."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clients = summary["clients"]
    figure = Figure(figsize=(min(4 + 0.35 * len(clients), 16), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(clients))
    bottom = [0] * len(clients)
    colours = colormaps["tab20" if len(summary["labels"]) > 10 else "tab10"]
    for j, name in enumerate(summary["labels"]):
        heights = [c["labels"][name] for c in clients]
        axes.bar(positions, heights, bottom=bottom, label=name, color=colours(j % colours.N), width=0.85)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylim(0, max(max(bottom, default=0), 1) * 1.05)
    axes.set_xlabel("client")
    axes.set_ylabel("examples (train + validation)")
    axes.set_title(f"Labels per client ({summary['partition']['method']} partition)")
    if len(clients) <= TICKS:
        axes.set_xticks(list(positions), [c["client"].removeprefix("client-") for c in clients], rotation=90)
    if len(summary["labels"]) <= 20:
        axes.legend(title="label", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_partition_summary(directory: Path, summary: dict[str, Any]) -> None:
    """partition_summary.json, labels.json (id -> name) and partition.png, each written atomically."""
    write_json_atomic(directory / SUMMARY_FILE, summary)
    write_json_atomic(directory / LABELS_FILE, {"labels": summary["labels"],
                                                "id2label": dict(enumerate(summary["labels"]))})
    write_bytes_atomic(directory / PLOT_FILE, plot_partition(summary))
