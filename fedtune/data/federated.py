"""The data of a federation: the run's fixed label list, the server hold-out plus one split per
simulated client, and (in deployment) one institution's own file.

Everything is derived deterministically from the config, so the server process and every
simulation worker rebuild the same splits without exchanging any data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from logging import WARNING
from pathlib import Path
from typing import Any

from fedtune import constants as k
from fedtune.config import DataConfig
from fedtune.data.canaries import Canaries, canary_texts, place, plan_canaries
from fedtune.data.demo import LABELS, make_demo_dataset
from fedtune.data.loaders import LabeledTexts, _count, as_label_name, listed, load_labeled_texts
from fedtune.data.partition import (
    ClientSplit,
    check_partitions,
    holdout_split,
    partition_indices,
    split_client,
)
from fedtune.data.users import by_user, canary_user, own_split
from fedtune.errors import ConfigError, DataError

Texts = tuple[list[str], list[int]]


@dataclass(frozen=True)
class FederatedData:
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    server_test: tuple[int, ...]
    clients: tuple[ClientSplit, ...]
    client_ids: tuple[str, ...] = ()  # partition `column`: each client's value of data.partition_column
    skipped: tuple[str, ...] = ()  # invalid records left out of the data (data.skip_invalid_rows)
    notes: tuple[str, ...] = ()  # warnings about the values read (data/loaders.py)
    canaries: Canaries | None = None  # the privacy audit's canaries (data.canaries); members are in the records
    users: tuple[str, ...] = ()  # data.user_column: whose record each is (empty when it is not set)

    def select(self, indices) -> Texts:
        return [self.texts[i] for i in indices], [self.labels[i] for i in indices]

    @property
    def groups(self) -> tuple[int, ...]:  # what the partition summary counts per client: the labels
        return self.labels

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.label_names


def file_stamp(path: str) -> tuple[int, int] | None:
    """(modification time, size) of data.path: a per-process cache keyed by it reads a changed file again."""
    found = Path(path) if path else None
    return (found.stat().st_mtime_ns, found.stat().st_size) if found is not None and found.exists() else None


def source_records(data: DataConfig) -> LabeledTexts:
    """The checked records at data.path, read once per process (and again if the file changes)."""
    return _records(data.path, data.format, data.text_column, data.label_column, data.separator, data.encoding,
                    data.skip_invalid_rows, data.partition_column, data.user_column, file_stamp(data.path))


@lru_cache(maxsize=4)
def _records(path: str, fmt: str, text_column: str, label_column: str, separator: str, encoding: str,
             skip_invalid_rows: bool, partition_column: str, user_column: str, stamp: Any) -> LabeledTexts:
    return load_labeled_texts(DataConfig(path=path, format=fmt, text_column=text_column, label_column=label_column,
                                         separator=separator, encoding=encoding, skip_invalid_rows=skip_invalid_rows,
                                         partition_column=partition_column, user_column=user_column))


def sort_labels(names: Collection[str]) -> tuple[str, ...]:
    """Numeric labels in numeric order (2 before 10), any others alphabetically."""
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


# More labels than this, and more than half as many as records: the label column is a text or an id.
MANY_LABELS = 50


def label_names(data: DataConfig) -> tuple[str, ...]:
    """The run's labels in id order: data.labels once fixed, else derived from the data."""
    if data.source == "demo":
        if data.labels and data.labels != LABELS:
            raise DataError(f"data.labels is {list(data.labels)}, but the demo data's labels are fixed: "
                            f"{list(LABELS)}. Remove data.labels, or use your own data (data.path).")
        return LABELS
    if data.labels:
        return data.labels
    records = source_records(data)
    found = set(records.labels)
    if len(found) < 2:
        raise DataError(f"{records.name} has a single label ({', '.join(found)}) in column `{data.label_column}`; "
                        "a classifier needs at least two. Check data.label_column (or data.separator).")
    if len(found) > MANY_LABELS and len(found) > len(records.labels) / 2:
        raise DataError(f"{records.name} has {len(found)} different labels in column `{data.label_column}` for "
                        f"{len(records.labels)} records: it looks like a text or an id, not a class. Check "
                        "data.label_column and data.text_column; if they really are classes, list them in "
                        "data.labels.")
    return sort_labels(found)


def resolve_data(data: DataConfig) -> DataConfig:
    """The data config to save with a new run: an absolute data.path and the label list fixed."""
    if data.source == "file" and Path(data.path).exists():
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    return dataclasses.replace(data, labels=label_names(data))


def label_ids(records: LabeledTexts, names: Sequence[str]) -> list[int | None]:
    """Each record's label id under the run's label list; None for a label outside it."""
    # A list saved before labels were normalised may name "2.0" where the file's label now reads "2".
    ids = {**{as_label_name(name): i for i, name in enumerate(names)}, **{name: i for i, name in enumerate(names)}}
    return [ids.get(label) for label in records.labels]


def encode_labels(records: LabeledTexts, names: Sequence[str]) -> list[int]:
    """Label ids under the run's label list; a label outside it is a DataError naming the rows."""
    found = label_ids(records, names)
    unknown = [i for i, label in enumerate(found) if label is None]
    if unknown:
        values = sorted({records.labels[i] for i in unknown})
        raise DataError(f"{records.name} has labels that are not in this run's label list ({', '.join(names)}): "
                        f"{listed(values)} ({records.where(unknown)}). The list is fixed when a run starts, so "
                        "every client and evaluation uses the same ids: fix those rows, or start a new run whose "
                        "data.labels names every label.")
    return found  # type: ignore[return-value]  # none is None


def federated_data(data: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Build (once per process, and again if data.path changes) the hold-out and the per-client splits;
    raises DataError."""
    return _federated_data(data, num_clients, seed, file_stamp(data.path))


@lru_cache(maxsize=4)
def _federated_data(data: DataConfig, num_clients: int, seed: int, stamp: Any) -> FederatedData:
    names = label_names(data)
    groups: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    users: tuple[str, ...] = ()  # data.user_column's values; the demo data has none
    if data.source == "demo":
        examples = make_demo_dataset(data.demo_examples, seed=seed)
        texts = tuple(e.text for e in examples)
        labels = tuple(e.label for e in examples)
    else:
        records = source_records(data)
        texts, labels, groups = records.texts, tuple(encode_labels(records, names)), records.groups
        skipped, notes, users = records.skipped, records.notes, records.users
    if users:  # a person's records stay together: data/users.py
        test, splits, parts = by_user(labels, users, groups, data, num_clients, seed)
    else:
        pool, test = holdout_split(len(texts), data.test_fraction, seed)
        parts = partition_indices(labels, pool, num_clients, data.partition, data.alpha, seed, groups=groups,
                                  group_column=data.partition_column, shards_per_client=data.shards_per_client)
        splits = tuple(split_client(p, texts, data.client_val_fraction, seed + cid) for cid, p in enumerate(parts))
    check_partitions(splits)
    client_ids = tuple(groups[p[0]] for p in parts) if data.partition == "column" else ()
    fed = FederatedData(texts, labels, names, tuple(test), splits, client_ids, skipped, notes=notes, users=users)
    return with_canaries(fed, data.canaries, data.canary_repeats, seed) if data.canaries else fed


def with_canaries(fed: FederatedData, count: int, repeats: int, seed: int) -> FederatedData:
    """The federation with the audit's member canaries added to their clients' training data, after
    every split was made (data/canaries.py); `fed.canaries` keeps all of them, in and out. With a
    user column, each canary is a user of its own, whose copies share its id (data/users.py::canary_user)."""
    plan = plan_canaries(count, len(fed.clients), repeats, seed)
    texts, labels = canary_texts(count, len(fed.label_names), seed, taken=set(fed.texts))
    members, splits = place(plan, len(fed.texts), fed.clients)
    taken = set(fed.users)
    users = fed.users + tuple(canary_user(i, taken) for i in members) if fed.users else ()
    return dataclasses.replace(fed, texts=fed.texts + tuple(texts[i] for i in members),
                               labels=fed.labels + tuple(labels[i] for i in members), clients=splits, users=users,
                               canaries=Canaries(plan, tuple(zip(texts, labels, strict=True)), len(fed.texts)))


# ---- deployment: an institution's own file, named in its node config ---------------------------

NODE_DATA_KEYS = {k.DATA_FORMAT: "format", k.DATA_TEXT_COLUMN: "text_column", k.DATA_LABEL_COLUMN: "label_column",
                  k.DATA_SEPARATOR: "separator", k.DATA_ENCODING: "encoding", k.DATA_USER_COLUMN: "user_column"}


# An institution's share of its own records kept for validation: its node config's, never the run's. The
# records on each side are decided by a hash keyed by a secret of the node's (client/data.py::split_secret),
# so the two counts its replies carry are the same in every message: with the coordinator's fraction and
# seed, two evaluate messages whose fractions straddle one text's hash told by the validation count whether
# that text was in the file (a review).
OWN_VAL_FRACTION = 0.1


def node_data_config(data: DataConfig, node_config: Mapping[str, Any]) -> DataConfig:
    """The run's data config pointed at this node's own file (node config `data-path` and friends);
    text and label columns, separator and encoding default to the run's. The user column does not:
    which column names a person in its own file is the institution's to say (node config
    `user-column`), since a coordinator naming a per-record column would turn user-level DP back
    into record-level."""
    own = {field: str(node_config[key]) for key, field in NODE_DATA_KEYS.items() if key in node_config}
    fmt = own.pop("format", "auto")
    own.setdefault("user_column", "")
    val_fraction = node_config.get(k.DATA_VAL_FRACTION, OWN_VAL_FRACTION)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
        raise ConfigError(f"Invalid node config `{k.DATA_VAL_FRACTION}`: {val_fraction!r}; use a number in [0, 1) "
                          f"such as {OWN_VAL_FRACTION}.")
    # A record at fault (an empty text, a malformed row, a label outside the run's list) is left out, never the
    # whole file: an institution that failed every round because of one record would show the server, in its
    # status, whether that record is there (local_data logs what it left out, here only).
    return dataclasses.replace(data, source="file", path=str(node_config[k.DATA_PATH]), format=fmt,
                               partition="iid", partition_column="", skip_invalid_rows=True,
                               client_val_fraction=float(val_fraction), **own)


def local_data(data: DataConfig, secret: str) -> tuple[Texts, Texts, tuple[str, ...]]:
    """(train, validation) texts and label ids from this node's own file, and whose each training
    record is (data.user_column; empty when it is not set). Validation holds whole users."""
    if not data.labels:
        raise DataError(f"This client reads its own file {data.path}, but the server sent no label list "
                        "(data.labels), so label ids could not match the other clients'. Start the run with a "
                        "fedtune server, which fixes the list from its data.")
    records = load_labeled_texts(data)
    ids = label_ids(records, data.labels)
    unknown = [i for i, label in enumerate(ids) if label is None]
    left_out(data.path, [*records.skipped, *([f"{_count(len(unknown), records.unit)} with a label outside this "
                                              f"run's list ({', '.join(data.labels)}): "
                                              f"{listed(sorted({records.labels[i] for i in unknown}))} "
                                              f"({records.where(unknown)})"] if unknown else [])])
    keep = [i for i, label in enumerate(ids) if label is not None]
    if not keep:
        raise DataError(f"{data.path} has no record with a label in this run's list ({', '.join(data.labels)}).")
    texts, users = [records.texts[i] for i in keep], [records.users[i] for i in keep] if records.users else []
    split = own_split(texts, users, data.client_val_fraction, secret)

    def pick(part: Sequence[int]) -> Texts:
        return [texts[i] for i in part], [ids[keep[i]] for i in part]  # type: ignore[misc]

    return pick(split.train), pick(split.val), tuple(users[i] for i in split.train) if users else ()


def left_out(path: str, problems: Sequence[str]) -> None:
    """Say in this node's log which records of its own file were left out, and why: never to the server
    (it can quote the records)."""
    if problems:
        from flwr.common.logger import log

        log(WARNING, "fedtune: left out of %s, which trains on the rest: %s", path, "; ".join(problems))
