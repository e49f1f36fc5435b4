"""The data of a simulated federation: server hold-out plus one split per client.

Everything is derived deterministically from the config, so the server process and every
simulation worker rebuild the same splits without exchanging any data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fedtune.config import DataConfig
from fedtune.data.demo import LABELS, make_demo_dataset
from fedtune.data.partition import (
    ClientSplit,
    check_partitions,
    holdout_split,
    partition_indices,
    split_client,
)


@dataclass(frozen=True)
class FederatedData:
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    server_test: tuple[int, ...]
    clients: tuple[ClientSplit, ...]

    def select(self, indices) -> tuple[list[str], list[int]]:
        return [self.texts[i] for i in indices], [self.labels[i] for i in indices]


@lru_cache(maxsize=4)
def federated_data(data: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Build (once per process) the hold-out and the per-client splits; raises DataError."""
    examples = make_demo_dataset(data.demo_examples, seed=seed)
    texts = tuple(e.text for e in examples)
    labels = tuple(e.label for e in examples)
    pool, test = holdout_split(len(examples), data.test_fraction, seed)
    parts = partition_indices(labels, pool, num_clients, data.partition, data.alpha, seed)
    splits = tuple(split_client(p, data.client_val_fraction, seed + cid) for cid, p in enumerate(parts))
    check_partitions(splits)
    return FederatedData(texts, labels, LABELS, tuple(test), splits)
