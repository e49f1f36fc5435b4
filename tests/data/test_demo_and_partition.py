"""The demo data is deterministic and learnable-shaped; partitions are disjoint and checked."""

from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedtune.config import DataConfig
from fedtune.data.demo import LABELS, make_demo_dataset
from fedtune.data.federated import federated_data
from fedtune.data.partition import holdout_split, in_validation, partition_indices, split_client
from fedtune.data.text import pad_batch
from fedtune.data.users import own_split
from fedtune.errors import DataError


def test_demo_dataset_is_deterministic_and_uses_every_label():
    a, b = make_demo_dataset(400, seed=3), make_demo_dataset(400, seed=3)
    assert a == b and a != make_demo_dataset(400, seed=4)
    counts = Counter(e.label for e in a)
    assert set(counts) == set(range(len(LABELS)))
    assert min(counts.values()) > 40  # no class is vanishingly rare


def test_same_symptom_can_get_different_labels():
    """Not a bag-of-symptoms task: modifiers change the urgency."""
    phrases = ("a low-grade fever", "a suspected broken wrist")
    labels_by_phrase = {phrase: set() for phrase in phrases}
    for e in make_demo_dataset(2000, seed=0):
        for phrase in phrases:
            if phrase in e.text:
                labels_by_phrase[phrase].add(e.label)
    assert all(len(labels) >= 2 for labels in labels_by_phrase.values()), labels_by_phrase


def test_federated_splits_are_disjoint_and_cover_the_pool():
    fed = federated_data(DataConfig(demo_examples=500), 5, 0)
    seen = [i for split in fed.clients for i in (*split.train, *split.val)]
    assert len(seen) == len(set(seen))
    assert set(seen).isdisjoint(fed.server_test)
    assert len(seen) + len(fed.server_test) == 500
    assert all(len(split.val) >= 1 and len(split.train) >= 1 for split in fed.clients)


def test_dirichlet_partitions_are_non_iid():
    fed = federated_data(DataConfig(demo_examples=1000, alpha=0.3), 5, 0)
    shares = []
    for split in fed.clients:
        labels = [fed.labels[i] for i in split.train]
        shares.append(max(Counter(labels).values()) / len(labels))
    assert max(shares) > 0.45  # IID would put ~0.25-0.3 in the largest class


def test_more_clients_than_examples_is_a_clear_error():
    labels = [0, 1, 0, 1]
    with pytest.raises(DataError, match="5 clients but only 4 training examples"):
        partition_indices(labels, range(4), 5, "iid", 0.5, 0)


@given(n=st.integers(1, 300), clients=st.integers(1, 20), frac=st.floats(0.05, 0.5))
def test_holdout_and_iid_partitions_never_lose_or_duplicate_examples(n, clients, frac):
    pool, test = holdout_split(n, frac, 0)
    assert sorted(pool + test) == list(range(n))
    if clients <= len(pool):
        parts = partition_indices([0] * n, pool, clients, "iid", 1.0, 0)
        assert sorted(i for p in parts for i in p) == sorted(pool)


@given(size=st.integers(1, 50), frac=st.floats(0.0, 0.9), seed=st.integers(0, 10**6))
def test_client_split_loses_and_duplicates_nothing(size, frac, seed):
    keys = [f"record {i}" for i in range(size)]
    split = split_client(range(size), keys, frac, seed)
    assert sorted(split.train + split.val) == list(range(size))


def test_one_record_more_or_less_changes_a_clients_training_set_by_that_record_alone():
    """A review: a shuffle of all the records decided the validation split, so a file with one record removed
    had dozens of other records change sides (63 to 139 of 1,000), and DP-SGD's add/remove-one guarantee did
    not hold for the training sets. Each record's side now follows from its own text."""
    texts = [f"customer query number {i}" for i in range(1000)]
    full = split_client(range(1000), texts, 0.1, 7)
    assert 60 <= len(full.val) <= 140, "about a tenth kept for validation"
    for gone in (0, 500, 999):
        rest = texts[:gone] + texts[gone + 1:]
        fewer = split_client(range(999), rest, 0.1, 7)
        assert {rest[i] for i in fewer.train} == {texts[i] for i in full.train} - {texts[gone]}
        assert {rest[i] for i in fewer.val} == {texts[i] for i in full.val} - {texts[gone]}


def test_an_institutions_users_keep_their_side_whoever_else_is_in_the_file():
    """By user (dp.unit `user`): one person added to the file moves no other person between the splits."""
    users = [f"patient-{i // 3}" for i in range(300)]
    texts = [f"note {i}" for i in range(300)]
    full = own_split(texts, users, 0.2, 3)
    fewer = own_split(texts[3:], users[3:], 0.2, 3)  # patient-0's three notes gone
    assert {users[3:][i] for i in fewer.train} == {users[i] for i in full.train} - {"patient-0"}
    assert {users[3:][i] for i in fewer.val} == {users[i] for i in full.val} - {"patient-0"}
    kept_back = next(key for key in map(str, range(100)) if in_validation(key, 0.5, 0))
    with pytest.raises(DataError, match="client_val_fraction"):
        own_split([kept_back], [], 0.5, 0)


def test_batches_are_padded_to_their_longest_text_only():
    items = [(torch.tensor([101, 5, 102]), torch.tensor(1)), (torch.tensor([101, 102]), torch.tensor(0))]
    batch = pad_batch(items)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_tokenize_counts_truncated_texts(tokenized):
    from fedtune.data.text import tokenize
    from fedtune.models.build import load_tokenizer

    data = tokenize(load_tokenizer(""), ["word " * 50, "short"], [0, 1], max_length=16)
    assert data.num_truncated == 1 and max(len(ids) for ids in data.input_ids) == 16


def test_tokenize_accepts_no_texts():
    # a client's validation split is empty when data.client_val_fraction is 0
    from fedtune.data.text import tokenize
    from fedtune.models.build import load_tokenizer

    data = tokenize(load_tokenizer(""), [], [], max_length=16)
    assert len(data) == 0 and data.num_truncated == 0


def test_a_partition_made_once_is_read_back_without_flwr_datasets(tmp_path):
    """The server partitions before a simulation starts; its workers then read the index lists
    instead of importing flwr-datasets (seconds of each worker's start-up)."""
    import json
    import os
    import subprocess
    import sys

    probe = ("import json, sys\n"
             "from fedtune.config import DataConfig\n"
             "from fedtune.data.federated import federated_data\n"
             "fed = federated_data(DataConfig(demo_examples=300, partition='dirichlet', alpha=0.5), 7, 3)\n"
             "print(json.dumps({'splits': [[list(s.train), list(s.val)] for s in fed.clients],\n"
             "                  'imported': 'flwr_datasets' in sys.modules or 'datasets' in sys.modules}))\n")
    env = {**os.environ, "FEDTUNE_CACHE": str(tmp_path)}

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    first, second = run(), run()
    assert first["imported"] and not second["imported"]
    assert first["splits"] == second["splits"]
    assert len(list((tmp_path / "partitions").iterdir())) == 1


BASE = dict(labels=[i % 3 for i in range(60)], pool=list(range(60)), num_clients=4, method="dirichlet",
            alpha=0.5, seed=0, groups=[f"g{i % 4}" for i in range(60)], shards_per_client=2)


def _partition(**changes):
    args = {**BASE, **changes}
    return partition_indices(args.pop("labels"), args.pop("pool"), args.pop("num_clients"), args.pop("method"),
                             args.pop("alpha"), args.pop("seed"), group_column="site", **args)


@pytest.mark.parametrize("base, change", [
    ({}, {"seed": 1}), ({}, {"alpha": 5.0}), ({}, {"num_clients": 5}), ({}, {"pool": list(range(51))}),
    ({}, {"labels": [(i + 1) % 3 for i in range(60)]}), ({}, {"method": "iid"}),
    ({"method": "shard"}, {"method": "shard", "shards_per_client": 3}),
    ({"method": "column"}, {"method": "column", "groups": [f"g{(i + 1) % 4}" for i in range(60)]}),
])
def test_every_input_of_a_partition_is_in_its_cache_key(tmp_path, monkeypatch, base, change):
    """Changing any one input is a new cache entry, never the old one read back, and it holds what
    flwr-datasets gives with no cache at all."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "warm"))
    _partition(**base)
    changed = _partition(**change)
    assert len(list((tmp_path / "warm" / "partitions").iterdir())) == 2
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cold"))
    assert _partition(**change) == changed


def test_a_cache_entry_that_is_no_partition_of_the_pool_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    right = _partition()
    (entry,) = (tmp_path / "partitions").iterdir()
    wrongs = ("null", "[[0, 1], [1, 2], [3], [4]]", "[[0], [1], [2]]", "[[0], [1], [2], [999]]",
              '[["0"], [1], [2], [3]]')
    for wrong in wrongs:
        entry.write_text(wrong)
        assert _partition() == right
