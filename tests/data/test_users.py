"""A person's records stay together (data.user_column): at one client, on one side of every split,
and a file that cannot say whose each record is, is refused."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from fedtune import constants as k
from fedtune.config import DataConfig, FedtuneConfig
from fedtune.data.federated import federated_data, local_data, node_data_config, resolve_data
from fedtune.data.summary import partition_summary, summary_lines
from fedtune.data.users import group_by_user
from fedtune.errors import ConfigError, DataError

LABELS = ("pets", "sport", "money")


def write_notes(path: Path, users: int = 60, seed: int = 0, hospitals: int = 0) -> Path:
    """Notes of `users` patients, from 1 to about 20 records each (a long tail), labelled mostly by patient."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "text", "label", "hospital"])
        for u in range(users):
            for visit in range(min(int(rng.paretovariate(1.0)), 20)):
                label = LABELS[(u + (visit % 5 == 4)) % 3]
                writer.writerow([f"P{u:03d}", f"visit {visit} of patient {u}: {label}", label,
                                 f"H{u % max(hospitals, 1)}"])
    return path


def _users_of(fed, indices) -> set[str]:
    """Read from each record's own text, not from fed.users: the split is checked against the file."""
    return {fed.texts[i].split("of patient ")[1].split(":")[0] for i in indices}


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shard"])
def test_each_users_records_are_at_one_client_and_on_one_side_of_every_split(tmp_path, partition):
    data = resolve_data(DataConfig(path=str(write_notes(tmp_path / "notes.csv")), user_column="patient_id",
                                   partition=partition, client_val_fraction=0.2, test_fraction=0.2))
    fed = federated_data(data, 4, seed=0)
    where: dict[str, set[str]] = {}
    sides = [("server", fed.server_test)] + [(f"{cid}-{part}", getattr(split, part))
                                             for cid, split in enumerate(fed.clients) for part in ("train", "val")]
    for side, indices in sides:
        for user in _users_of(fed, indices):
            where.setdefault(user, set()).add(side)
    assert all(len(places) == 1 for places in where.values()), {u: p for u, p in where.items() if len(p) > 1}
    every = sorted(i for _, indices in sides for i in indices)
    assert every == list(range(len(fed.texts)))  # nothing lost, nothing twice
    assert len(where) == len(set(fed.users)) > 40


def test_the_summary_counts_users_per_client(tmp_path):
    data = resolve_data(DataConfig(path=str(write_notes(tmp_path / "notes.csv")), user_column="patient_id"))
    fed = federated_data(data, 3, seed=0)
    summary = partition_summary(fed, data, [8] * len(fed.texts), 64)
    assert summary["users"] == len(set(fed.users)) and summary["user_column"] == "patient_id"
    for row, split in zip(summary["clients"], fed.clients, strict=True):
        assert row["train_users"] == len(_users_of(fed, split.train)) < row["train"]
    assert "users:" in "\n".join(summary_lines(summary)[0])
    from fedtune.server.prepare import records_beyond_k

    sizes = [len([i for i in split.train if fed.users[i] == u]) for split in fed.clients
             for u in {fed.users[i] for i in split.train}]
    beyond = records_beyond_k(fed, 3)
    assert beyond == {"max_records_per_user": 3, "users_above_k": sum(n > 3 for n in sizes),
                      "records_above_k": sum(n - 3 for n in sizes if n > 3)} and beyond["users_above_k"] > 0
    summary.update(beyond)
    assert "have more than dp.max_records_per_user = 3" in "\n".join(summary_lines(summary)[0])


def test_grouping_keeps_each_users_positions():
    grouped = group_by_user(list("abcdef"), ["u2", "u1", "u2", "u3", "u1", "u2"])
    assert len(grouped) == 3 and grouped.num_records == 6
    assert [grouped[u] for u in range(3)] == [(1, 4), (0, 2, 5), (3,)]  # u1, u2, u3


def test_a_missing_column_or_empty_user_ids_are_refused(tmp_path):
    notes = write_notes(tmp_path / "notes.csv")
    with pytest.raises(DataError, match=r"notes\.csv has no column `patient`.*data\.user_column"):
        federated_data(resolve_data(DataConfig(path=str(notes), user_column="patient")), 3, seed=0)
    rows = notes.read_text().splitlines()
    rows[3] = "," + rows[3].split(",", 1)[1]
    (tmp_path / "gaps.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"gaps\.csv: 1 line with an empty.*column `patient_id` \(line 4\)"):
        federated_data(resolve_data(DataConfig(path=str(tmp_path / "gaps.csv"), user_column="patient_id")), 3, 0)
    lines = tmp_path / "notes.txt"
    lines.write_text("a note\tpets\nanother\tsport\n")
    with pytest.raises(DataError, match="`lines` format.*data.user_column"):
        federated_data(resolve_data(DataConfig(path=str(lines), user_column="patient_id")), 2, seed=0)


def test_user_level_dp_needs_a_user_column_and_a_file():
    with pytest.raises(ConfigError, match="dp.unit.*data.user_column"):
        FedtuneConfig().with_overrides({"dp.unit": "user", "data.path": "notes.csv"})
    with pytest.raises(ConfigError, match="data.user_column.*demo data"):
        DataConfig(user_column="patient_id")
    with pytest.raises(ConfigError, match="data.canary_repeats.*dp.unit = user"):
        FedtuneConfig().with_overrides({"data.canary_repeats": 3})
    FedtuneConfig().with_overrides({"dp.unit": "user", "data.path": "n.csv", "data.user_column": "p",
                                    "data.canaries": 10, "data.canary_repeats": 3})  # canary users: accepted


def test_a_canary_user_is_one_user_whose_copies_share_its_id(tmp_path):
    from fedtune.client.data import client_data
    from fedtune.config import ModelConfig

    data = resolve_data(DataConfig(path=str(write_notes(tmp_path / "notes.csv")), user_column="patient_id",
                                   canaries=12, canary_repeats=3))
    fed = federated_data(data, 3, seed=0)
    real = len(fed.texts) - sum(fed.canaries.members)
    canary_users = set(fed.users[real:])
    assert len(canary_users) == sum(fed.canaries.members) and not canary_users & set(fed.users[:real])
    for cid, split in enumerate(fed.clients):
        _, _, grouped = client_data(data, ModelConfig(max_length=16), 3, 0, cid)
        users = [fed.users[i] for i in split.train]  # the order client_data groups them in
        planted = [u for u in users if u in canary_users]
        assert len(planted) == 3 * len(fed.canaries.plan.at_client(cid))  # each canary user: 3 records
        assert all(planted.count(u) == 3 for u in planted)
        assert len(grouped) == len(set(users)) and sorted(len(g) for g in grouped.users) == \
            sorted(users.count(u) for u in set(users))  # the client trains each canary user as one user
    assert sum(fed.canaries.members) > 0


def test_a_user_at_two_institutions_is_refused_under_column_partitioning(tmp_path):
    notes = write_notes(tmp_path / "notes.csv", hospitals=2)
    data = resolve_data(DataConfig(path=str(notes), user_column="patient_id", partition="column",
                                   partition_column="hospital"))
    fed = federated_data(data, 2, seed=0)
    for split, hospital in zip(fed.clients, fed.client_ids, strict=True):  # each patient's hospital is u % 2
        assert {int(user) % 2 for user in _users_of(fed, split.train)} == {int(hospital[1:])}
    rows = notes.read_text().splitlines()
    first = rows[1].split(",")
    rows.append(",".join([first[0], "a visit elsewhere: pets", "pets", "H1" if first[3] == "H0" else "H0"]))
    (tmp_path / "moved.csv").write_text("\n".join(rows) + "\n")
    moved = resolve_data(DataConfig(path=str(tmp_path / "moved.csv"), user_column="patient_id", partition="column",
                                    partition_column="hospital"))
    with pytest.raises(DataError, match=f"more than one institution.*{first[0]} \\(H0, H1\\)"):
        federated_data(moved, 2, seed=0)


def test_an_institutions_own_file_is_split_by_user(tmp_path):
    notes = write_notes(tmp_path / "notes.csv", users=40)
    run = resolve_data(DataConfig(path=str(notes)))
    own = node_data_config(run, {k.DATA_PATH: str(notes), k.DATA_USER_COLUMN: "patient_id"})
    (train_texts, _), (val_texts, _), users = local_data(own, secret="0")
    assert len(users) == len(train_texts) and val_texts
    val_users = {text.split("patient ")[1].split(":")[0] for text in val_texts}
    assert {f"P{int(u):03d}" for u in val_users}.isdisjoint(users)


def test_a_node_groups_its_own_file_by_the_column_its_node_config_names(tmp_path):
    from flwr.app import Context, RecordDict

    from fedtune.client.data import local_data as node_data
    from fedtune.data.users import UserRecords

    notes = write_notes(tmp_path / "notes.csv", users=30)
    cfg = FedtuneConfig().with_overrides({"data.path": "server.csv", "data.labels": list(sorted(LABELS)),
                                          "data.user_column": "person", "dp.unit": "user"})
    node = {k.DATA_PATH: str(notes), k.DATA_USER_COLUMN: "patient_id"}  # its own file names the column otherwise
    train, val = node_data(cfg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))
    assert isinstance(train, UserRecords) and len(train) < train.num_records and len(val)
    for without in ({k.DATA_PATH: str(notes), k.DATA_USER_COLUMN: ""}, {k.DATA_PATH: str(notes)}):
        # the run's data.user_column ("person") is not taken for a node's own file: the node names its own
        with pytest.raises(DataError, match="this node names no column.*user-column"):
            node_data(cfg, Context(run_id=1, node_id=7, node_config=without, state=RecordDict(), run_config={}))
