"""What a Ray node checks before round 1 (simulation/shared_paths.py): that it sees the driver's
client_state/ (read and written) and the same data.path. On a real cluster it runs as a task pinned
to each node (tests/integration/test_existing_cluster.py); here the node-side function is called
as a node with another copy, or other data, would run it."""

from __future__ import annotations

from fedtune.simulation.shared_paths import PROBE, data_digest, what_node_sees


def _driver(tmp_path, token="a1b2"):
    state = tmp_path / "run" / "client_state"
    state.mkdir(parents=True)
    (state / PROBE).write_text(token)
    data = tmp_path / "data.csv"
    data.write_text("text,label\nhello,a\nworld,b\n")
    return state, data


def test_a_node_that_sees_the_driver_files_answers_and_finds_nothing(tmp_path):
    state, data = _driver(tmp_path)
    assert what_node_sees(str(state), "a1b2", "n1", str(data), data_digest(str(data))) == []
    assert (state / f"{PROBE}-n1").read_text() == "a1b2", "its answer, for the driver to read back"


def test_a_node_with_its_own_copy_of_the_run_directory_is_named(tmp_path):
    state, data = _driver(tmp_path, token="an older token")
    problems = what_node_sees(str(state), "a1b2", "n1", str(data), data_digest(str(data)))
    assert len(problems) == 1 and "another copy" in problems[0] and str(state) in problems[0]
    assert not (state / f"{PROBE}-n1").exists()


def test_a_node_without_the_run_directory_is_named(tmp_path):
    _, data = _driver(tmp_path)
    missing = tmp_path / "elsewhere" / "client_state"
    problems = what_node_sees(str(missing), "a1b2", "n1", str(data), data_digest(str(data)))
    assert len(problems) == 1 and "cannot use" in problems[0] and str(missing) in problems[0]


def test_other_or_missing_data_is_named(tmp_path):
    state, data = _driver(tmp_path)
    digest = data_digest(str(data))
    data.write_text("text,label\nhello,a\nworld,a\n")  # one label changed, same size
    problems = what_node_sees(str(state), "a1b2", "n1", str(data), digest)
    assert problems == [f"data.path {str(data)!r} holds other data than the driver's (SHA-256 differs)"]
    problems = what_node_sees(str(state), "a1b2", "n1", str(tmp_path / "nope.csv"), digest)
    assert len(problems) == 1 and "is not there" in problems[0]


def test_a_directory_digest_covers_names_and_contents_and_a_hub_id_is_not_checked(tmp_path):
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "a.arrow").write_bytes(b"12")
    first = data_digest(str(folder))
    (folder / "train" / "a.arrow").write_bytes(b"13")
    assert data_digest(str(folder)) != first
    (folder / "train" / "a.arrow").write_bytes(b"12")
    assert data_digest(str(folder)) == first
    (folder / "train" / "a.arrow").rename(folder / "train" / "b.arrow")
    assert data_digest(str(folder)) != first
    assert data_digest("someone/a-hub-dataset") is None
    state, _ = _driver(tmp_path)
    assert what_node_sees(str(state), "a1b2", "n1", "someone/a-hub-dataset", None) == []
