"""A user's file becomes a federation: a fixed label list, the partitions it asks for, the checks
a user needs, the summary saved with the run, and an institution's own file in deployment."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from fedtune import constants as k
from fedtune.config import DataConfig, FedtuneConfig
from fedtune.data.demo import LABELS
from fedtune.data.federated import (
    federated_data,
    label_names,
    local_data,
    node_data_config,
    resolve_data,
    sort_labels,
)
from fedtune.data.partition import in_validation
from fedtune.data.summary import (
    LABELS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    partition_summary,
    save_partition_summary,
    summary_lines,
)
from fedtune.errors import ConfigError, DataError

TOPICS = ("sport", "money", "pets", "weather")


def write_csv(path: Path, n: int = 240, hospitals: int = 0, labels=TOPICS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "hospital_id"])
        for i in range(n):
            writer.writerow([f"note {i} about {labels[i % len(labels)]}", labels[i % len(labels)],
                             f"H{i % hospitals}" if hospitals else "H0"])
    return path


def cfg_for(path: Path, **options) -> DataConfig:
    return DataConfig(path=str(path), **options)


# ---- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, option", [
    ({"source": "file"}, "data.path"),
    ({"path": "x.csv", "text_column": "t", "label_column": "t"}, "data.label_column"),
    ({"path": "x.txt", "separator": ""}, "data.separator"),
    ({"path": "x.csv", "partition": "column"}, "data.partition_column"),
    ({"partition_column": "hospital_id", "partition": "column"}, "data.partition_column"),  # demo has no columns
    ({"path": "x.csv", "labels": ("a", "a")}, "data.labels"),
    ({"path": "x.csv", "shards_per_client": 0}, "data.shards_per_client"),
])
def test_invalid_data_options_name_the_option(options, option):
    with pytest.raises(ConfigError, match=f"`{option}`"):
        DataConfig(**options)


def test_a_path_selects_the_file_source_and_the_config_round_trips():
    cfg = FedtuneConfig().with_overrides({"data.path": "notes.csv", "data.labels": ["b", "a"],
                                          "data.partition": "shard"})
    assert cfg.data.source == "file" and cfg.data.labels == ("b", "a")
    assert FedtuneConfig.from_flat(cfg.to_flat()) == cfg
    assert FedtuneConfig().data.source == "demo"


# ---- the label list ------------------------------------------------------------------------------------

def test_labels_are_fixed_from_the_data_and_saved_in_the_config(tmp_path, monkeypatch):
    write_csv(tmp_path / "d.csv")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_data(cfg_for(Path("d.csv")))
    assert resolved.labels == tuple(sorted(TOPICS)) and resolved.path == str(tmp_path.resolve() / "d.csv")
    fed = federated_data(resolved, 3, 0)
    assert [fed.label_names[y] for y in fed.labels[:4]] == ["sport", "money", "pets", "weather"]
    assert resolve_data(DataConfig()).labels == LABELS


def test_numeric_labels_sort_as_numbers():
    assert sort_labels({"10", "2", "0", "-1"}) == ("-1", "0", "2", "10")
    assert sort_labels({"b", "10", "a"}) == ("10", "a", "b")


def test_a_fixed_label_list_is_kept_and_unknown_labels_are_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    fixed = cfg_for(path, labels=("weather", "pets", "money", "sport", "unused"))
    fed = federated_data(fixed, 3, 0)
    assert fed.label_names == fixed.labels and fed.labels[0] == fixed.labels.index("sport")
    with pytest.raises(DataError, match=r"not in this run's label list \(money, pets, sport\): weather "
                                        r"\(lines 5, 9, 13, 17, 21 and 55 more\)"):
        federated_data(cfg_for(path, labels=("money", "pets", "sport")), 3, 0)


def test_a_single_label_is_not_a_classification_task(tmp_path):
    path = write_csv(tmp_path / "d.csv", labels=("only",))
    with pytest.raises(DataError, match="single label.*at least two"):
        label_names(cfg_for(path))


def test_a_label_column_that_is_a_text_or_an_id_is_refused(tmp_path):
    """Columns swapped by mistake: 120 records with 120 different labels would train a 120-way head."""
    path = write_csv(tmp_path / "d.csv", n=120, labels=TOPICS)
    with pytest.raises(DataError, match=r"120 different labels in column `text` for 120 records.*data\.label_column"):
        label_names(cfg_for(path, label_column="text", text_column="label"))
    many = write_csv(tmp_path / "many.csv", n=240, labels=tuple(f"intent{i}" for i in range(77)))
    assert len(label_names(cfg_for(many))) == 77, "77 intents over 240 records is a task, not an id column"


def test_demo_labels_cannot_be_renamed():
    with pytest.raises(DataError, match="demo data's labels are fixed"):
        label_names(DataConfig(labels=("a", "b")))


# ---- partitions ------------------------------------------------------------------------------------------

def _client_labels(fed) -> list[set[int]]:
    return [{fed.labels[i] for i in (*split.train, *split.val)} for split in fed.clients]


def test_every_partition_covers_the_pool_without_overlap(tmp_path):
    path = write_csv(tmp_path / "d.csv", hospitals=4)
    for partition, extra in (("iid", {}), ("dirichlet", {}), ("shard", {}),
                             ("column", {"partition_column": "hospital_id"})):
        fed = federated_data(cfg_for(path, partition=partition, **extra), 4, 0)
        seen = [i for split in fed.clients for i in (*split.train, *split.val)]
        assert len(seen) == len(set(seen)) and set(seen).isdisjoint(fed.server_test), partition
        if partition != "shard":  # shards of equal size may leave a remainder out
            assert len(seen) + len(fed.server_test) == 240, partition


def test_shards_give_each_client_few_labels(tmp_path):
    fed = federated_data(cfg_for(write_csv(tmp_path / "d.csv"), partition="shard", shards_per_client=1), 4, 0)
    assert all(len(labels) <= 2 for labels in _client_labels(fed))  # one label-sorted shard, maybe a boundary
    iid = federated_data(cfg_for(write_csv(tmp_path / "d.csv"), partition="iid"), 4, 0)
    assert all(len(labels) == 4 for labels in _client_labels(iid))


def test_shards_need_enough_examples(tmp_path):
    with pytest.raises(DataError, match=r"4 x 20 shards.*data\.shards_per_client"):
        federated_data(cfg_for(write_csv(tmp_path / "d.csv", n=60), partition="shard", shards_per_client=20), 4, 0)


def test_column_partition_gives_one_client_per_value(tmp_path):
    path = write_csv(tmp_path / "d.csv", hospitals=3)
    fed = federated_data(cfg_for(path, partition="column", partition_column="hospital_id"), 3, 0)
    assert fed.client_ids == ("H0", "H1", "H2")
    notes = {f"note {i} about {TOPICS[i % 4]}": f"H{i % 3}" for i in range(240)}
    for cid, split in enumerate(fed.clients):
        assert {notes[fed.texts[i]] for i in (*split.train, *split.val)} == {fed.client_ids[cid]}


def test_column_partition_needs_as_many_clients_as_values(tmp_path):
    path = write_csv(tmp_path / "d.csv", hospitals=3)
    with pytest.raises(DataError, match=r"one client per distinct value of `hospital_id`.*3 of them \(H0, H1, H2\).*"
                                        r"`clients` is 5\. Set `clients` to 3"):
        federated_data(cfg_for(path, partition="column", partition_column="hospital_id"), 5, 0)


def test_column_partition_says_when_a_value_went_wholly_to_the_hold_out(tmp_path):
    path = write_csv(tmp_path / "d.csv", n=40, hospitals=2)
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow(["the lone note", "sport", "H9"])
    data = cfg_for(path, partition="column", partition_column="hospital_id", test_fraction=0.5)
    for seed in range(20):  # find a seed whose hold-out took H9's only record
        try:
            federated_data(data, 3, seed)
        except DataError as err:
            assert "H9 had so few records" in str(err) and "data.test_fraction" in str(err)
            return
    pytest.fail("no seed put the lone record in the hold-out")


def test_more_clients_than_examples_and_empty_partitions_are_refused(tmp_path):
    with pytest.raises(DataError, match="50 clients but only"):
        federated_data(cfg_for(write_csv(tmp_path / "d.csv", n=40)), 50, 0)


# ---- the partition summary -------------------------------------------------------------------------------

def test_summary_counts_every_example_and_truncated_text(tmp_path):
    path = write_csv(tmp_path / "d.csv", hospitals=3)
    data = cfg_for(path, partition="column", partition_column="hospital_id", labels=tuple(sorted(TOPICS)))
    fed = federated_data(data, 3, 0)
    lengths = [100 if i % 10 == 0 else 64 for i in range(len(fed.texts))]  # 64 tokens fit exactly
    summary = partition_summary(fed, data, lengths, max_length=64)
    clients = summary["clients"]
    assert summary["truncated"] == 24 and summary["longest_tokens"] == 100
    assert sum(c["truncated"] for c in clients) + summary["server_test"]["truncated"] == 24
    assert sum(c["examples"] for c in clients) + summary["server_test"]["examples"] == 240
    for cid, c in enumerate(clients):
        split = fed.clients[cid]
        assert (c["train"], c["val"]) == (len(split.train), len(split.val))
        assert c["labels"] == dict(sorted(Counter(fed.label_names[fed.labels[i]]
                                                  for i in (*split.train, *split.val)).items()))
        assert c["hospital_id"] == fed.client_ids[cid]
    lines, warnings = summary_lines(summary)
    assert len(lines) == 3 + 3 and "money/pets/sport/weather" in lines[2]
    assert warnings and "24 of 240 texts" in warnings[0] and "model.max_length" in warnings[0]


def test_summary_of_many_clients_is_a_digest(tmp_path):
    data = cfg_for(write_csv(tmp_path / "d.csv", n=400), partition="iid")
    fed = federated_data(data, 40, 0)
    lines, warnings = summary_lines(partition_summary(fed, data, [5] * len(fed.texts), 64))
    assert len(lines) == 5 and "examples per client: min" in lines[2] and not warnings


def test_summary_files_are_written(tmp_path):
    data = DataConfig(demo_examples=200)
    fed = federated_data(data, 3, 0)
    save_partition_summary(tmp_path, partition_summary(fed, data, [5] * 200, 64))
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["labels"] == list(LABELS)
    assert json.loads((tmp_path / LABELS_FILE).read_text())["id2label"]["3"] == "emergency"
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


# ---- deployment: an institution's own file ----------------------------------------------------------------

def test_a_node_reads_its_own_file_with_the_runs_labels(tmp_path):
    path = write_csv(tmp_path / "mine.csv", n=50, labels=("pets", "sport"))
    run_data = resolve_data(cfg_for(write_csv(tmp_path / "server.csv")))
    node = {k.DATA_PATH: str(path), k.DATA_FORMAT: "csv"}
    own = node_data_config(run_data, node)
    assert own.path == str(path) and own.labels == run_data.labels
    (train_texts, train_ids), (val_texts, val_ids), users = local_data(own, secret="0")
    assert len(train_texts) + len(val_texts) == 50 and 0 < len(val_texts) < 15  # about data.client_val_fraction
    assert all(in_validation(text, own.client_val_fraction, "0") for text in val_texts)  # each by its own text
    assert {run_data.labels[i] for i in train_ids + val_ids} == {"pets", "sport"}
    assert set(train_texts).isdisjoint(val_texts) and users == ()


def test_node_config_can_name_its_own_columns(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"body": "a note", "y": "pets"}\n{"body": "another", "y": "sport"}\n')
    run_data = dataclasses.replace(DataConfig(), labels=tuple(sorted(TOPICS)))
    own = node_data_config(run_data, {k.DATA_PATH: str(path), k.DATA_TEXT_COLUMN: "body", k.DATA_LABEL_COLUMN: "y"})
    (texts, ids), (val, _), _ = local_data(own, secret="0")
    assert sorted(texts + val) == ["a note", "another"] and own.source == "file"


def test_a_record_at_fault_in_an_institutions_file_is_left_out_and_said_only_in_its_log(tmp_path):
    """A review: one row with a label outside the run's list (or an empty text) failed the whole file, so the
    institution failed every round, and the server saw in its status whether that one record was there. Such a
    record is now left out on its own, and the node's log (never the reply) says which and why."""
    import logging

    path = write_csv(tmp_path / "mine.csv", n=10, labels=("pets", "dragons"))
    with path.open("a") as handle:
        handle.write(",pets,H0\n")  # an empty text
    own = node_data_config(DataConfig(path="x.csv", labels=("pets", "sport")), {k.DATA_PATH: str(path)})
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        (train, train_ids), (val, val_ids), _ = local_data(own, secret="0")
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert sorted(train + val) == sorted(f"note {i} about pets" for i in range(0, 10, 2)), "the dragons rows left out"
    assert set(train_ids + val_ids) == {0}
    assert len(said) == 1 and "mine.csv" in said[0] and "dragons" in said[0] and "lines 3, 5, 7, 9, 11" in said[0]
    assert "empty or missing text" in said[0]
    unlabelled = node_data_config(DataConfig(), {k.DATA_PATH: str(path)})
    with pytest.raises(DataError, match="server sent no label list"):
        local_data(unlabelled, secret="0")
    none_known = node_data_config(DataConfig(path="x.csv", labels=("money", "sport")), {k.DATA_PATH: str(path)})
    with pytest.raises(DataError, match="no record with a label in this run's list"):
        local_data(none_known, secret="0")


def test_the_client_app_trains_on_its_own_file_without_a_partition_id(tmp_path):
    from flwr.app import Context, RecordDict

    from fedtune.client.app import client_name
    from fedtune.client.data import local_data

    path = write_csv(tmp_path / "mine.csv", n=30, labels=("pets", "sport"))
    cfg = FedtuneConfig().with_overrides({"data.path": "server.csv", "data.labels": ["money", "pets", "sport"]})
    context = Context(run_id=1, node_id=77, node_config={k.DATA_PATH: str(path)}, state=RecordDict(), run_config={})
    train, val = local_data(cfg, context)
    assert len(train) + len(val) == 30 and set(train.labels) | set(val.labels) == {1, 2}
    assert client_name(context) == "node-77"
    simulated = Context(run_id=1, node_id=5, node_config={k.PARTITION_ID: 2, k.NUM_PARTITIONS: 3}, state=RecordDict(),
                        run_config={})
    assert client_name(simulated) == "client-0002"


def test_what_is_wrong_with_a_nodes_own_file_stays_in_its_log_not_in_the_reply(tmp_path, caplog):
    """A label outside the run's list is named with its line; that can be a record's sensitive value,
    and the reason of a failed reply reaches the server's ledger. The node logs it; the error says where."""
    from flwr.app import Context, RecordDict

    from fedtune.client.data import local_data

    path = write_csv(tmp_path / "mine.csv", n=30, labels=("lions", "dragons"))  # no label in the run's list
    cfg = FedtuneConfig().with_overrides({"data.path": "server.csv", "data.labels": ["money", "pets", "sport"]})
    context = Context(run_id=1, node_id=77, node_config={k.DATA_PATH: str(path)}, state=RecordDict(), run_config={})
    with caplog.at_level("WARNING", logger="flwr"), pytest.raises(DataError) as raised:
        local_data(cfg, context)
    assert "dragons" not in str(raised.value) and "node's log" in str(raised.value)
    assert "dragons" in caplog.text, "the operator still gets the reason"


def test_token_lengths_agree_with_tokenize_on_truncation():
    from fedtune.data.text import token_counts, tokenize
    from fedtune.models.build import load_tokenizer

    tokenizer = load_tokenizer("")
    texts = ["word " * 50, "short", "word " * 14]  # 14 words + [CLS] + [SEP] = exactly 16
    lengths = token_counts(tokenizer, texts, 16)
    assert lengths[2] == 16
    assert sum(n > 16 for n in lengths) == tokenize(tokenizer, texts, [0, 1, 0], 16).num_truncated == 1


def test_a_huge_text_costs_no_more_memory_than_its_first_tokens():
    """One 50 MB text took 4.7 GB in the server and 11 GB in a worker: it was tokenized in full."""
    import tracemalloc

    from fedtune.data.text import token_counts, tokenize
    from fedtune.models.build import load_tokenizer

    tokenizer = load_tokenizer("")
    huge = "symptoms worsening overnight " * 400_000  # 11.6 MB
    tracemalloc.start()
    data = tokenize(tokenizer, [huge, "short"], [0, 1], 64)
    counts = token_counts(tokenizer, [huge], 64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert data.num_truncated == 1 and len(data.input_ids[0]) == 64 and counts[0] > 64
    assert data.input_ids[0] == tokenize(tokenizer, [" ".join(huge.split()[:100])], [0], 64).input_ids[0]
    assert peak < 5e6, f"peak {peak / 1e6:.0f} MB of Python allocations"
