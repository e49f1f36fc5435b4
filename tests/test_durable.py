"""Durable writes (fedtune/durable.py): whole or not at all, and each new directory's entry synced too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtune import durable


@pytest.fixture
def synced(monkeypatch) -> list[Path]:
    """The directories durable fsyncs, in order."""
    calls: list[Path] = []
    real = durable._sync_directory
    monkeypatch.setattr(durable, "_sync_directory", lambda directory: (calls.append(Path(directory)),
                                                                        real(directory)))
    return calls


def test_a_file_written_into_new_directories_has_each_new_directorys_entry_synced(tmp_path, synced):
    """A review: a client's first state file was fsynced with its directory, but the run directory's entry for
    client_state/ never was, so a power loss could take the only record of its spending with it."""
    durable.write_json_atomic(tmp_path / "run" / "client_state" / "client-0000.json", {"history": []})
    assert synced[:2] == [tmp_path, tmp_path / "run"], "each new directory's parent, outermost first"
    assert synced[-1] == tmp_path / "run" / "client_state"


def test_a_replaced_directory_is_on_disk_before_and_after_its_rename(tmp_path, synced, monkeypatch):
    files: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        files.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    staging = tmp_path / ".adapter.x"
    (staging / "sub").mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_text("weights")
    (staging / "sub" / "more").write_text("more")
    durable.replace_dir_atomic(staging, tmp_path / "adapter")
    assert {str(staging / "adapter_model.safetensors"), str(staging / "sub" / "more")} <= set(files)
    assert synced[-1] == tmp_path, "the parent, after the rename"
    assert (tmp_path / "adapter" / "sub" / "more").read_text() == "more"


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "node-config.toml"
    path.write_text('epsilon-budget = 4.0\n')

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", no_space)
    with pytest.raises(OSError):
        durable.write_text_atomic(path, 'epsilon-budget = 8.0\n')
    assert path.read_text() == 'epsilon-budget = 4.0\n' and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_adapter_save_leaves_the_old_adapter_and_no_staging_copy(tmp_path):
    from fedtune.models.adapter import save_adapter

    class Failing:
        def save_pretrained(self, directory):
            (Path(directory) / "adapter_config.json").write_text("{")  # half written, then the disk fills
            raise OSError(28, "No space left on device")

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(OSError):
        save_adapter(Failing(), tmp_path / "adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def test_a_new_file_is_whole_or_absent_and_never_replaces_one(tmp_path, monkeypatch):
    """deploy/certs.py's keys: written with O_EXCL straight to their names, a crash mid-write left a cut-short
    private key that the next `prepare` refused to overwrite. Now a temp file is linked into place whole."""
    key = tmp_path / "node.key"
    durable.write_new_atomic(key, b"secret", 0o600)
    assert key.read_bytes() == b"secret" and (key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        durable.write_new_atomic(key, b"other", 0o600)
    assert key.read_bytes() == b"secret"

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        durable.write_new_atomic(tmp_path / "ca.crt", b"certificate", 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"], "no half file, no temp file"
