"""One way to set a run up, whichever entry point asks (server/prepare.py)."""

from __future__ import annotations

import pytest

from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.summary import SUMMARY_FILE
from fedtune.errors import ConfigError
from fedtune.server.prepare import new_run, open_run

CFG = FedtuneConfig(rounds=2, clients=2, data=DataConfig(demo_examples=40))


def test_a_new_run_saves_the_resolved_config_and_the_partition_summary(tmp_path):
    cfg, run, summary = new_run(CFG, tmp_path / "run")
    assert run.config() == cfg and cfg.data.labels and cfg.out == str(tmp_path / "run")
    assert (run.path / SUMMARY_FILE).is_file() and len(summary["clients"]) == 2


def test_open_run_continues_the_same_config_with_more_rounds(tmp_path):
    first, _ = open_run(CFG, tmp_path / "run")
    again, run = open_run(CFG.with_overrides({"rounds": 5}), tmp_path / "run")
    assert again.rounds == 5 and again.with_overrides({"rounds": 2}) == first
    assert run.config().rounds == 5


def test_open_run_refuses_to_continue_a_run_under_another_config(tmp_path):
    """`flwr run` used to resume whatever run was in `out`, whatever the config asked."""
    open_run(CFG, tmp_path / "run")
    saved = (tmp_path / "run" / "config.toml").read_text()
    # a σ given by hand replaces the private recipe's target ε, and its learning rate follows σ (fedtune/recipe.py);
    # a rank given by hand keeps the recipe's scale alpha / r = 2
    with pytest.raises(ConfigError, match=r"another config \(dp.noise_multiplier, dp.target_epsilon, lora.alpha, "
                                          r"lora.r, train.learning_rate differ\)"):
        open_run(CFG.with_overrides({"lora.r": 8, "dp.noise_multiplier": 2.0}), tmp_path / "run")
    assert (tmp_path / "run" / "config.toml").read_text() == saved


def test_a_causal_lm_run_has_no_label_list_and_its_summary_counts_conversations(tmp_path):
    cfg = CFG.with_overrides({"model.task": "causal-lm"})
    cfg, run, summary = new_run(cfg, tmp_path / "run")
    assert cfg.data.labels == () and summary["examples"] == 40
    assert run.config().model == ModelConfig(task="causal-lm")


def test_a_resume_refuses_a_data_file_changed_since_the_run_started(tmp_path):
    """A review's case: one row added to the file moved 43 of 100 held-out records into training on resume,
    and records between clients, so no client's ε bounded what one record revealed any more."""
    import csv

    from fedtune.data.demo import LABELS, make_demo_dataset
    from fedtune.server.prepare import continue_run

    notes = tmp_path / "notes.csv"
    rows = [(e.text, LABELS[e.label]) for e in make_demo_dataset(60, seed=1)]
    with notes.open("w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    _, run, _ = new_run(FedtuneConfig(rounds=2, clients=2, data=DataConfig(path=str(notes))), tmp_path / "run")
    assert continue_run(run.path)[1].path == run.path, "unchanged: it continues"
    with notes.open("a", newline="") as handle:
        csv.writer(handle).writerow(rows[0])
    with pytest.raises(ConfigError, match=r"notes\.csv, as read and split now \(61 records\).*Restore the data"):
        continue_run(run.path)


def test_a_damaged_data_digest_stops_a_resume_naming_the_file(tmp_path):
    from fedtune.server.prepare import DATA_DIGEST, continue_run

    _, run, _ = new_run(CFG, tmp_path / "run")
    (run.path / DATA_DIGEST).write_text("{half")
    with pytest.raises(ConfigError, match=r"data_digest\.json is damaged.*Restore the file"):
        continue_run(run.path)


def test_a_run_on_a_save_to_disk_directory_is_checked_on_resume_too(tmp_path):
    """The digest is of the records as read, so a directory (datasets' save_to_disk) has one too (a first
    version fingerprinted the file, and crashed on a directory after creating the run directory)."""
    import datasets

    from fedtune.data.demo import LABELS, make_demo_dataset
    from fedtune.server.prepare import DATA_DIGEST, continue_run

    notes = make_demo_dataset(60, seed=1)
    datasets.Dataset.from_dict({"text": [e.text for e in notes], "label": [LABELS[e.label] for e in notes]}
                               ).save_to_disk(str(tmp_path / "hf"))
    _, run, _ = new_run(FedtuneConfig(rounds=2, clients=2, data=DataConfig(path=str(tmp_path / "hf"))),
                        tmp_path / "run")
    assert (run.path / DATA_DIGEST).is_file()
    assert continue_run(run.path)[1].path == run.path
    datasets.Dataset.from_dict({"text": [e.text for e in notes[1:]], "label": [LABELS[e.label] for e in notes[1:]]}
                               ).save_to_disk(str(tmp_path / "hf2"))
    (tmp_path / "hf").rename(tmp_path / "old")
    (tmp_path / "hf2").rename(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"hf, as read and split now \(59 records\), is not what"):
        continue_run(run.path)


def test_flwr_run_reopens_only_its_own_runs(tmp_path):
    """A review's case: `flwr run` with `out` at a `fedtune simulate` run (same config) continued it with other
    clients, under other names and state directories, each from ε = 0."""
    from fedtune.server.run_dir import DEPLOY_LOCAL

    new_run(CFG, tmp_path / "sim")
    with pytest.raises(ConfigError, match=r"not a `flwr run` run: continue that run with `fedtune simulate --resume"):
        open_run(CFG, tmp_path / "sim")
    open_run(CFG, tmp_path / "flwr")
    assert open_run(CFG.with_overrides({"rounds": 3}), tmp_path / "flwr")[0].rounds == 3, "its own: continued"
    _, deployed, _ = new_run(CFG, tmp_path / "deployed", engine=DEPLOY_LOCAL)
    assert open_run(CFG, tmp_path / "deployed")[1].path == deployed.path, "deploy-local's ServerApp, under flwr run"
    (tmp_path / "sim" / "engine").unlink()  # a run from before the engine was kept: reopened, as before
    assert open_run(CFG, tmp_path / "sim")[1].path == tmp_path / "sim"


def test_a_moved_run_directory_is_continued_where_it_is_now(tmp_path):
    """A review: config.toml kept the run's first location in `out`, which deploy-local's resume sends to the
    ServerApp; moved, the ServerApp would have started a new run at the old path (or gone on with the
    original, if the directory was a copy)."""
    from fedtune.server.prepare import continue_run

    _, run, _ = new_run(CFG, tmp_path / "first")
    (tmp_path / "first").rename(tmp_path / "moved")
    cfg, moved = continue_run(tmp_path / "moved")
    assert cfg.out == str((tmp_path / "moved").resolve()) == moved.config().out
