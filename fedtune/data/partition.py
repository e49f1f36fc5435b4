"""Split a labelled dataset into a server hold-out and one partition per simulated client.

Partitioning uses flwr-datasets' partitioners on an index column, so any of them can be
swapped in; this module only adds the checks a user needs (empty or too-small partitions).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

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


def _partitioner(method: str, num_clients: int, alpha: float, seed: int) -> Partitioner:
    if method == "iid":
        return IidPartitioner(num_partitions=num_clients)
    return DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                min_partition_size=MIN_TRAIN_EXAMPLES, self_balancing=True, seed=seed)


def partition_indices(labels: Sequence[int], pool: Sequence[int], num_clients: int, method: str,
                      alpha: float, seed: int) -> list[list[int]]:
    """Split `pool` (indices into `labels`) over `num_clients` clients."""
    if num_clients > len(pool):
        raise DataError(f"There are {num_clients} clients but only {len(pool)} training examples, so "
                        "some clients would get no data. Use fewer clients (--clients) or more data.")
    table = Dataset.from_dict({"index": list(pool), "label": [labels[i] for i in pool]})
    partitioner = _partitioner(method, num_clients, alpha, seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [list(partitioner.load_partition(cid)["index"]) for cid in range(num_clients)]
    except ValueError as err:
        raise DataError(f"The {method} partitioner could not give each of {num_clients} clients at least "
                        f"{MIN_TRAIN_EXAMPLES} examples ({err}). Use fewer clients, more data, or a larger "
                        "--alpha.") from err
    return parts


def split_client(indices: Sequence[int], val_fraction: float, seed: int) -> ClientSplit:
    """Keep a share of a client's examples for its own validation."""
    order = list(indices)
    random.Random(seed).shuffle(order)
    num_val = int(len(order) * val_fraction)
    if val_fraction > 0 and len(order) >= 2:
        num_val = min(max(num_val, 1), len(order) - 1)
    return ClientSplit(train=tuple(order[num_val:]), val=tuple(order[:num_val]))


def check_partitions(splits: Sequence[ClientSplit]) -> None:
    """Refuse a federation in which some client has nothing to train on."""
    for cid, split in enumerate(splits):
        if len(split.train) == 0:
            raise DataError(f"Client {cid} has an empty training partition. Use fewer clients, more data, "
                            "or a less skewed partition (--partition iid or a larger --alpha).")
