"""Split a labelled dataset into a server hold-out and one partition per simulated client.

Partitioning uses flwr-datasets' partitioners on an index column, so any of them can be
swapped in; this module only adds the checks a user needs (empty or too-small partitions).

The result is kept in fedtune's cache (fedtune/cache.py), keyed by everything that fixes it: the
partitioner and all its arguments, the pool's indices, labels and groups, and the versions of
flwr-datasets, datasets and numpy (whose random streams it draws from). The server partitions
before the simulation starts, so its workers read the index lists instead of importing
flwr-datasets and `datasets` (about 1 s of each worker's start-up: flwr-datasets' package imports
pandas and seaborn for its plots). Without a writable cache they partition again, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.cache import cached_json
from fedtune.errors import DataError

MIN_TRAIN_EXAMPLES = 2


@dataclass(frozen=True)
class ClientSplit:
    train: tuple[int, ...]
    val: tuple[int, ...]


def holdout_split(num_examples: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(pool for clients, server test set), as shuffled index lists."""
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    num_test = max(1, round(num_examples * test_fraction))
    return order[num_test:], order[:num_test]


def _partitioner_spec(method: str, num_clients: int, alpha: float, seed: int,
                      shards_per_client: int) -> tuple[str, dict[str, Any]]:
    """The flwr-datasets partitioner for `method`: its class name and every argument it gets."""
    if method == "iid":
        return "IidPartitioner", {"num_partitions": num_clients}
    if method == "shard":  # label-sorted shards: each client sees only a few labels (McMahan et al. 2017)
        return "ShardPartitioner", {"num_partitions": num_clients, "partition_by": "label",
                                    "num_shards_per_partition": shards_per_client, "shuffle": True, "seed": seed}
    if method == "column":
        return "NaturalIdPartitioner", {"partition_by": "group"}
    return "DirichletPartitioner", {"num_partitions": num_clients, "partition_by": "label", "alpha": alpha,
                                    "min_partition_size": MIN_TRAIN_EXAMPLES, "self_balancing": True, "seed": seed}


def partition_indices(labels: Sequence[int], pool: Sequence[int], num_clients: int, method: str,
                      alpha: float, seed: int, *, groups: Sequence[str] = (), group_column: str = "",
                      shards_per_client: int = 2, unit: str = "examples") -> list[list[int]]:
    """Split `pool` (indices into `labels`) over `num_clients` clients. Method `column` gives client i
    the records whose `groups` value is the i-th in sorted order. `unit`: what an index is, in messages
    (data/users.py partitions users)."""
    columns = {"index": list(pool), "label": [labels[i] for i in pool]}
    if method == "column":
        _check_groups(groups, pool, num_clients, group_column)
        columns["group"] = [groups[i] for i in pool]
    if num_clients > len(pool):
        raise DataError(f"There are {num_clients} clients but only {len(pool)} training {unit}, so "
                        "some clients would get no data. Use fewer `clients` or more data.")
    if method == "shard" and num_clients * shards_per_client > len(pool):
        raise DataError(f"Partition `shard` cuts the {len(pool)} training {unit} into clients x shards per "
                        f"client = {num_clients} x {shards_per_client} shards, more than there are {unit}. "
                        "Use fewer `clients`, a smaller data.shards_per_client, or more data.")
    spec = _partitioner_spec(method, num_clients, alpha, seed, shards_per_client)
    versions = {name: importlib.metadata.version(name) for name in ("flwr-datasets", "datasets", "numpy")}
    return cached_json("partitions", ["partition-v2", versions, method, spec, columns],
                       lambda: _partition(columns, method, spec, num_clients, unit),
                       valid=lambda parts: _is_partition(parts, num_clients, columns["index"]))


def _is_partition(parts: Any, num_clients: int, pool: list[int]) -> bool:
    """A cache entry is used only if it is a split of the pool into num_clients lists."""
    if not (isinstance(parts, list) and len(parts) == num_clients and all(isinstance(p, list) for p in parts)):
        return False
    flat = [i for p in parts for i in p]
    return all(type(i) is int for i in flat) and len(set(flat)) == len(flat) and set(flat) <= set(pool)


def _partition(columns: dict[str, list], method: str, spec: tuple[str, dict[str, Any]],
               num_clients: int, unit: str) -> list[list[int]]:
    import flwr_datasets.partitioner
    from datasets import Dataset

    name, arguments = spec
    partitioner = getattr(flwr_datasets.partitioner, name)(**arguments)
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        # flwr-datasets draws tqdm bars and warns about pyarrow options: noise for a fedtune user.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            parts = [list(partitioner.load_partition(cid)["index"]) for cid in range(num_clients)]
    except ValueError as err:
        fix = {"dirichlet": "a larger data.alpha", "shard": "a smaller data.shards_per_client"}.get(method, "")
        raise DataError(f"The {method} partitioner could not give each of {num_clients} clients at least "
                        f"{MIN_TRAIN_EXAMPLES} {unit} ({err}). Use fewer clients, more data"
                        f"{', or ' + fix if fix else ''}.") from err
    return parts


def _check_groups(groups: Sequence[str], pool: Sequence[int], num_clients: int, column: str) -> None:
    """Natural partitioning needs exactly one client per distinct value of the column."""
    everywhere = sorted(set(groups))
    in_pool = sorted({groups[i] for i in pool})
    if len(in_pool) == num_clients:
        return
    gone = [g for g in everywhere if g not in in_pool]
    note = (f" ({', '.join(gone[:5])} had so few records that all went to the server's hold-out; "
            "lower data.test_fraction)" if gone else "")
    raise DataError(f"Partition `column` makes one client per distinct value of `{column}`, and the clients' "
                    f"data has {len(in_pool)} of them ({', '.join(in_pool[:10])}"
                    f"{', ...' if len(in_pool) > 10 else ''}){note}, but `clients` is {num_clients}. "
                    f"Set `clients` to {len(in_pool)}.")


def split_client(indices: Sequence[int], keys: Sequence[str], val_fraction: float, seed: int | str) -> ClientSplit:
    """Keep a share of a client's examples for its own validation. Each one's side follows from its own key
    (`keys[i]`: its text, or its user's id) and the seed alone, never from the others or their number: a
    shuffle of them all, which this was, moved dozens of other records between training and validation when
    one record was added to a file, so two files that differ by one record gave training sets that differ by
    many, and DP-SGD's guarantee (for training sets that differ by one) did not hold. About `val_fraction` of
    them go to validation; a client with none left to train on is refused by check_partitions."""
    if val_fraction <= 0:
        return ClientSplit(train=tuple(indices), val=())
    val = [in_validation(keys[i], val_fraction, seed) for i in indices]
    return ClientSplit(train=tuple(i for i, v in zip(indices, val, strict=True) if not v),
                       val=tuple(i for i, v in zip(indices, val, strict=True) if v))


def in_validation(key: str, val_fraction: float, seed: int | str) -> bool:
    """Whether the record (or user) of `key` is kept for validation: a hash of the seed and the key alone,
    read as a number in [0, 1), below `val_fraction`. `seed`: the run seed in simulation; an institution's
    own file uses a secret of its own instead (client/data.py::split_secret)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def check_partitions(splits: Sequence[ClientSplit]) -> None:
    """Refuse a federation in which some client has nothing to train on."""
    for cid, split in enumerate(splits):
        if len(split.train) == 0:
            kept = (f" (all {len(split.val)} of its records went to its validation split: a lower "
                    "data.client_val_fraction keeps fewer there)" if split.val else "")
            raise DataError(f"Client {cid} has an empty training partition{kept}. Use fewer clients, more data, "
                            "or a less skewed partition (data.partition `iid` or a larger data.alpha).")
