"""A person's records kept together (data.user_column): the federation's splits by user, and a
client's training records grouped by user, which user-level DP-SGD samples (privacy/dpsgd.py).

Every split here is a split of users, not of records: the server's hold-out, each client's share and
each client's own validation part hold whole users. So one person's records are never at two
clients (a person belongs to one institution), and never both trained on and held out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from fedtune.config import DataConfig
from fedtune.data.loaders import listed
from fedtune.data.partition import ClientSplit, holdout_split, partition_indices, split_client
from fedtune.errors import DataError


@dataclass(frozen=True)
class UserRecords(Dataset):
    """One client's training records grouped by person: item u is the positions in `records` of user
    u's records. Its length is the number of users, the n that user-level accounting counts."""

    records: Dataset
    users: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, user: int) -> tuple[int, ...]:
        return self.users[user]

    @property
    def num_records(self) -> int:
        return len(self.records)


def train_units(fed, unit: str) -> list[int]:
    """Each client's n under dp.unit: its training records, or (`user`) its training users."""
    if unit == "user":
        return [len({fed.users[i] for i in split.train}) for split in fed.clients]
    return [len(split.train) for split in fed.clients]


def group_by_user(records: Dataset, user_ids: Sequence[str]) -> UserRecords:
    """`records` (in the order of `user_ids`, one id per record) grouped by user, users in id order."""
    return UserRecords(records, tuple(tuple(rows) for rows in records_by_user(user_ids)[1]))


def records_by_user(users: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """(user ids sorted, each one's record indices in order)."""
    members: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        members.setdefault(user, []).append(i)
    ids = sorted(members)
    return ids, [members[user] for user in ids]


def canary_user(canary: int, users: Collection[str]) -> str:
    """The user id of audit canary `canary` (a canary is a user of its own): one no real record has."""
    name = f"fedtune-canary-{canary:06d}"
    while name in users:
        name = "_" + name
    return name


def by_user(labels: Sequence[int], users: Sequence[str], groups: Sequence[str], data: DataConfig, num_clients: int,
            seed: int, method: str = "") -> tuple[tuple[int, ...], tuple[ClientSplit, ...], list[list[int]]]:
    """(server hold-out, client splits, client partitions), all as record indices, with every split
    made over users: the partitioner (`method`, default data.partition) sees one row per user, labelled
    with the user's most common label (for `dirichlet` and `shard`) and, for `column`, the user's one
    institution."""
    method = method or data.partition
    ids, records = records_by_user(users)
    user_labels = [Counter(labels[i] for i in rows).most_common(1)[0][0] for rows in records]
    user_groups = _institution_of_each(ids, records, groups, data) if method == "column" else ()
    pool, test = holdout_split(len(ids), data.test_fraction, seed)
    parts = partition_indices(user_labels, pool, num_clients, method, data.alpha, seed, groups=user_groups,
                              group_column=data.partition_column, shards_per_client=data.shards_per_client,
                              unit="users")

    def expand(chosen: Sequence[int]) -> tuple[int, ...]:
        return tuple(i for user in chosen for i in records[user])

    splits = []
    for cid, part in enumerate(parts):
        split = split_client(part, ids, data.client_val_fraction, seed + cid)
        splits.append(ClientSplit(expand(split.train), expand(split.val)))
    return expand(test), tuple(splits), [list(expand(part)) for part in parts]


def own_split(keys: Sequence[str], users: Sequence[str], val_fraction: float, seed: int | str) -> ClientSplit:
    """An institution's own file (deployment) split into training and validation records: by user
    when `users` names each record's user, else by record (`keys`: each record's text). Each record's,
    or user's, side follows from it alone (partition.split_client); none left to train on is refused."""
    if not users:
        split = split_client(range(len(keys)), keys, val_fraction, seed)
    else:
        ids, records = records_by_user(users)
        by_user = split_client(range(len(ids)), ids, val_fraction, seed)
        split = ClientSplit(*(tuple(i for user in part for i in records[user])
                              for part in (by_user.train, by_user.val)))
    if keys and not split.train:
        raise DataError(f"All {len(split.val)} {'users' if users else 'records'} of this institution's file went to "
                        "its validation split, none to training: lower data.client_val_fraction (now "
                        f"{val_fraction:g}) or add records.")
    return split


def _institution_of_each(ids: Sequence[str], records: Sequence[Sequence[int]], groups: Sequence[str],
                         data: DataConfig) -> list[str]:
    """Each user's value of data.partition_column; a user found at two institutions is refused."""
    found = [sorted({groups[i] for i in rows}) for rows in records]
    spanning = [f"{user} ({', '.join(values)})" for user, values in zip(ids, found, strict=True) if len(values) > 1]
    if spanning:
        raise DataError(f"Users named in `{data.user_column}` (data.user_column) have records at more than one "
                        f"institution of `{data.partition_column}` (data.partition_column): {listed(spanning)}. "
                        "Each person's records must be at one institution, so that one client's user-level "
                        "guarantee covers all of them: fix those rows of the institution column.")
    return [values[0] for values in found]
