"""A round is committed durably: checkpoint first, views rebuilt from it, nothing half-written."""

import json
from pathlib import Path

import pytest
import torch

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtune.server.run_dir import Checkpoint, RunDirectory


def _trained(round_: int, eps: float) -> LedgerEntry:
    return LedgerEntry(round_, "trained", "prv", num_examples=64, noise_multiplier=1.0, max_grad_norm=1.0,
                       sample_rate=0.25, steps=4, delta=1e-5, epsilon=eps, epsilon_other=eps * 1.1)


def _checkpoint(round_: int, eps: float) -> Checkpoint:
    ledger = PrivacyLedger("prv", True, {"client-0000": [_trained(r, eps * r) for r in range(1, round_ + 1)]})
    rows = [{"round": r, "eval_accuracy": 0.1 * r} for r in range(round_ + 1)]
    return Checkpoint(round_, {"w": torch.full((2,), float(round_))}, rows, ledger.to_dict(), {7: "client-0000"})


def test_commit_writes_checkpoint_and_views_but_leaves_the_ledger_to_its_owner(tmp_path):
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    PrivacyLedger.from_dict(_checkpoint(2, 0.5).ledger).save(run.path)  # the round loop's save, before committing
    run.commit(_checkpoint(1, 0.5))
    run.commit(_checkpoint(2, 0.5))
    latest = run.latest_checkpoint()
    assert latest.round == 2 and torch.equal(latest.arrays["w"], torch.tensor([2.0, 2.0]))
    assert latest.node_names == {7: "client-0000"}
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    ledger = json.loads((run.path / "privacy_ledger.json").read_text())
    assert [e["epsilon"] for e in ledger["clients"]["client-0000"]] == [0.5, 1.0]
    assert not [p for p in run.path.rglob("*.tmp")], "no temp files left behind"
    assert run.config() == FedtuneConfig()


def test_latest_checkpoint_orders_rounds_numerically(tmp_path):
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    for r in (2, 10, 9):
        run.commit(_checkpoint(r, 0.1))
    assert run.latest_checkpoint().round == 10


def test_refuses_to_reuse_a_non_empty_directory_or_resume_a_foreign_one(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        RunDirectory.create(tmp_path / "busy", FedtuneConfig())
    with pytest.raises(ConfigError, match="not a fedtune run directory"):
        RunDirectory.existing(tmp_path / "busy")


def test_ledger_epsilon_max_and_non_finite_values():
    ledger = PrivacyLedger("rdp", True)
    ledger.record_round("a", 1, "trained", _metrics(1.5))
    ledger.record_round("b", 1, "trained", _metrics(2.5))
    ledger.record_failure("b", 2, "worker died")
    assert ledger.epsilon_max() == 2.5
    off = PrivacyLedger("rdp", False)
    off.record_round("a", 1, "trained", _metrics(float("inf")))
    assert off.epsilon_max() is None and off.clients["a"][0].epsilon == float("inf")
    assert off.to_dict()["clients"]["a"][0]["epsilon"] is None, "an unbounded ε is null on disk"


def test_spending_reported_by_an_unfinished_round_survives_resume(tmp_path):
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    committed = _checkpoint(1, 0.5)
    run.commit(committed)
    pending = PrivacyLedger.from_dict(committed.ledger)
    pending.record_round("client-0000", 2, "trained", _metrics(1.0))
    pending.save(run.path)  # round 2 reported, then the server died before committing it
    ledger = run.ledger_to_resume(run.latest_checkpoint())
    entries = ledger.clients["client-0000"]
    assert [(e.round, e.interrupted) for e in entries] == [(1, False), (2, True)]
    assert ledger.spent("client-0000") == [(1.0, 0.25, 4), (1.0, 0.25, 4)], "the interrupted round's steps count"
    assert ledger.epsilon_max() == 1.0, "the retried round starts from the budget already spent"
    assert not run.ledger_to_resume(_checkpoint(2, 0.5)).clients["client-0000"][-1].interrupted


def _metrics(eps: float) -> dict:
    """A client's reply metrics (client/app.py's _report) with cumulative ε `eps`."""
    return {k.NUM_EXAMPLES: 64, k.NOISE_MULTIPLIER: 1.0, k.MAX_GRAD_NORM: 1.0, k.SAMPLE_RATE: 0.25, k.STEPS: 4,
            k.DELTA: 1e-5, k.EPSILON: eps, k.EPSILON_OTHER: eps * 1.1}


def test_every_json_file_is_strict_json(tmp_path):
    """NaN and Infinity, which strict parsers reject, are written as null."""
    import math

    from fedtune.durable import strict_json, write_json_atomic

    text = strict_json({"loss": math.nan, "eps": [math.inf, 1.5], "n": 3})
    assert text == '{"loss": null, "eps": [null, 1.5], "n": 3}'
    write_json_atomic(tmp_path / "x.json", {"eps": -math.inf})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {"eps": None}


def test_a_non_finite_aggregate_is_never_committed():
    """The review's --strategy fedadam --server-learning-rate 1e308: NaN committed with exit 0."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedtune.config import FedtuneConfig
    from fedtune.errors import FedtuneError
    from fedtune.server.rounds import _refuse_non_finite

    good = ArrayRecord({"lora_A": Array(np.ones(3, dtype=np.float32))})
    _refuse_non_finite(good, 1, FedtuneConfig())
    bad = ArrayRecord({"lora_A": Array(np.array([1.0, np.inf, 0.0], dtype=np.float32))})
    with pytest.raises(FedtuneError, match="NaN or Inf values in lora_A.*nothing of this round was committed"):
        _refuse_non_finite(bad, 2, FedtuneConfig())


def test_a_config_edited_against_its_checkpoint_is_refused_before_any_round(tmp_path):
    """lora.r or pooling edited in config.toml was noticed only after clients had trained and spent ε."""
    from fedtune.server.run_dir import model_options

    cfg = FedtuneConfig()
    run = RunDirectory.create(tmp_path / "run", cfg)
    arrays = {"lora_A": torch.zeros(4, 8)}
    saved = Checkpoint(1, arrays, options=model_options(cfg))
    run.check_resumable(saved, cfg, arrays)  # unchanged: fine
    edited = cfg.with_overrides({"lora.r": 8, "model.pooling": "mean", "lora.modules_to_save": []})
    with pytest.raises(ConfigError, match=r"model\.pooling = .cls. in the checkpoint.*lora\.r = 4 in the"):
        run.check_resumable(saved, edited, arrays)
    older = Checkpoint(1, arrays)  # written before the options were saved: the tensors still tell
    with pytest.raises(ConfigError, match="tensors"):
        run.check_resumable(older, cfg, {"lora_A": torch.zeros(8, 8)})


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 truncated"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    """A 0-byte checkpoint printed only `Aborted.`; a truncated one an 811-line traceback."""
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    run.commit(Checkpoint(1, {"w": torch.ones(2)}, ledger=PrivacyLedger("prv", True).to_dict()))
    run.checkpoint_path(2).write_bytes(damage)
    start, damaged = run.resume_point()
    assert start.round == 1 and damaged and damaged[0].startswith("round_0002.pt (")
    run.checkpoint_path(1).write_bytes(damage)
    with pytest.raises(ConfigError, match="No checkpoint .* can be read"):
        run.resume_point()


@pytest.mark.parametrize("text", ['{"clients": {', "{}", '{"accountant": "prv", "dp_enabled": true, "clients": 3}'])
def test_a_damaged_ledger_stops_a_resume_and_is_never_replaced(tmp_path, text):
    """A truncated ledger gave a 4,329-line traceback and a `{}` one KeyError."""
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    (run.path / "privacy_ledger.json").write_text(text)
    with pytest.raises(ConfigError, match="damaged.*Restore it from a backup"):
        run.read_ledger()
    assert (run.path / "privacy_ledger.json").read_text() == text


@pytest.mark.usefixtures("in_flower_run")
def test_a_round_that_too_few_sampled_clients_answer_is_not_committed():
    """A worker killed for memory left 18 rounds with 1 of 20 clients each, and a worthless adapter."""
    from flwr.app import ConfigRecord, Error, Message, RecordDict

    from fedtune.errors import FedtuneError
    from fedtune.server.rounds import _require_quorum

    sent = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in range(4)]
    ok = Message(RecordDict(), reply_to=sent[0])
    lost = [Message(Error(code=0, reason="worker died"), reply_to=m) for m in sent[1:]]
    with pytest.raises(FedtuneError, match="only 1 of the 4 sampled clients answered.*worker died.*--resume"):
        _require_quorum(3, sent, [ok, *lost], 0.5)
    _require_quorum(3, sent, [ok, *lost], 0.25)  # allowed by a lower share
    _require_quorum(3, [], [], 0.5)  # an empty Poisson cohort (client-level DP) is no failure


def test_an_atomic_write_syncs_the_file_then_its_directory(tmp_path, monkeypatch):
    """The rename is durable only once the directory is synced: a power loss could otherwise bring
    back the old ledger, which forgot some spending."""
    import os
    import stat

    from fedtune.durable import write_bytes_atomic

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append("directory" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_bytes_atomic(tmp_path / "ledger.json", b"{}")
    assert synced == ["file", "directory"] and (tmp_path / "ledger.json").read_bytes() == b"{}"


def test_a_crash_between_the_adapters_two_renames_loses_no_adapter(tmp_path):
    """replace_dir_atomic moves the old adapter aside, then the new one in. A crash between the two
    left only `.adapter.old`, which the next write used to delete: now it is put back first."""
    from fedtune.durable import replace_dir_atomic

    target, old = tmp_path / "adapter", tmp_path / ".adapter.old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_text("round 3")  # the crash's leftover: the only copy
    failing = tmp_path / "missing-staging"  # the next write fails too, before its own rename
    with pytest.raises(FileNotFoundError):
        replace_dir_atomic(failing, target)
    kept = target if target.exists() else old
    assert (kept / "adapter_model.safetensors").read_text() == "round 3", "the only copy survives"
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_text("round 4")
    replace_dir_atomic(staging, target)
    assert (target / "adapter_model.safetensors").read_text() == "round 4" and not old.exists()


def test_a_run_is_continued_only_by_the_command_that_made_it(tmp_path):
    """A review's case: a stopped `fedtune deploy-local` run suggested `fedtune simulate --resume`, whose
    clients (client-0000…, state in the run directory) are not the deployment's institutions (clinic-a…, state
    under deployment/): each would have started again from ε = 0 on the same records."""
    from fedtune.server.prepare import continue_run
    from fedtune.server.run_dir import DEPLOY_LOCAL, FLWR_RUN, SIMULATE

    deployed = RunDirectory.create(tmp_path / "deployed", FedtuneConfig(), DEPLOY_LOCAL)
    with pytest.raises(ConfigError) as refused:
        RunDirectory.create(deployed.path, FedtuneConfig())
    assert "simulate --resume" not in str(refused.value) and "deployment" in str(refused.value)
    with pytest.raises(ConfigError, match=r"not a `fedtune simulate` run.*ε = 0"):
        continue_run(deployed.path)
    older = RunDirectory.create(tmp_path / "older", FedtuneConfig(), DEPLOY_LOCAL)  # before the engine was kept
    (older.path / "engine").unlink()
    (older.path / "deployment").mkdir()
    assert older.engine == DEPLOY_LOCAL
    assert RunDirectory.create(tmp_path / "sim", FedtuneConfig()).engine == SIMULATE
    with pytest.raises(ConfigError, match="simulate --resume"):
        RunDirectory.create(tmp_path / "sim", FedtuneConfig())
    assert "flwr run" in RunDirectory.create(tmp_path / "flwr", FedtuneConfig(), FLWR_RUN).how_to_continue()
    # a review: the advice to "start it again and submit the same run" named no command that could
    assert f"fedtune deploy-local --resume {deployed.path}" in deployed.how_to_continue()


def test_a_lost_run_id_is_not_replaced_once_the_run_has_spent(tmp_path):
    """A review's case: a run directory copied without its run_id got a new one, silently; every client's own
    entries then belonged to "another run", each refused as having lost its state, and adopting the ledger's
    record counted the spending twice."""
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    made = run.run_id
    assert RunDirectory(run.path).run_id == made, "made with the run, kept by every reopening"
    PrivacyLedger("prv", True, {"client-0000": [LedgerEntry(1, k.STATUS_TRAINED, "prv", 64, 1.0, None, 1.0, 0.25, 4,
                                                            1e-5, 0.5)]}).save(run.path)
    (run.path / k.RUN_ID_FILE).unlink()
    assert run.run_id != made, "a simulation whose clients' entries name no run (before run ids): any id will do"
    (run.path / k.RUN_ID_FILE).unlink()
    run.client_state_dir.mkdir()
    (run.client_state_dir / "client-0000.json").write_text(json.dumps({"ledger": [{"round": 1, "run": made}]}))
    with pytest.raises(ConfigError, match="run_id is missing.*write the id back"):
        _ = run.run_id
    assert not (run.path / k.RUN_ID_FILE).exists()
    from fedtune.server.run_dir import DEPLOY_LOCAL

    deployed = RunDirectory.create(tmp_path / "deployed", FedtuneConfig(), DEPLOY_LOCAL)
    PrivacyLedger.load(run.path).save(deployed.path)
    (deployed.path / k.RUN_ID_FILE).unlink()
    with pytest.raises(ConfigError, match="run_id is missing"):  # its institutions' entries are not here to read
        _ = deployed.run_id


def test_one_run_directory_is_served_by_one_server_at_a_time(tmp_path):
    """A review: nothing stopped two servers (`--resume` started twice, `flwr run` submitted again with the same
    `out`) from serving one run; each kept its ledger in memory, and each save erased the other's spending."""
    import multiprocessing

    from fedtune.errors import FedtuneError
    from fedtune.server.app import serve

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    with run.served():
        with pytest.raises(FedtuneError, match=r"in use by another fedtune server.*simulate --resume"):
            serve(None, FedtuneConfig(), RunDirectory.existing(run.path))  # refused before it reads anything
        other = multiprocessing.get_context("spawn").Process(target=_serve_briefly, args=(str(run.path),))
        other.start()
        other.join(60)
        assert other.exitcode == 3, "another process is refused too"
    with run.served():  # released when the first server ends
        pass


def _serve_briefly(path: str) -> None:
    from fedtune.errors import FedtuneError

    try:
        with RunDirectory.existing(Path(path)).served():
            raise SystemExit(0)
    except FedtuneError:
        raise SystemExit(3) from None


def test_a_resume_of_a_run_being_served_leaves_its_config_as_it_is(tmp_path):
    """A review: the second server was refused only in serve(), after continue_run had already rewritten
    config.toml with its own `rounds`, and the first run then read as unfinished."""
    from fedtune.errors import FedtuneError
    from fedtune.server.prepare import continue_run

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig().with_overrides({"rounds": 2}))
    before = (run.path / "config.toml").read_bytes()
    with run.served(), pytest.raises(FedtuneError, match="in use by another fedtune server"):
        continue_run(run.path, rounds=20)
    assert (run.path / "config.toml").read_bytes() == before
    assert continue_run(run.path, rounds=3)[0].rounds == 3, "once the other server is done"
