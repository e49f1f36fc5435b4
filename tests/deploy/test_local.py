"""What deploy-local leaves on disk is private to whoever it belongs to."""

from __future__ import annotations

import stat

from fedtune.deploy.local import LocalFederation, write_private
from fedtune.deploy.processes import ProcessSet


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_coordinators_and_each_institutions_directories_are_owner_only(tmp_path):
    """superlink.db (made later by Flower, with its own mode) and every institution's key, node
    config and privacy state sit in directories no other user can enter."""
    fed = LocalFederation(tmp_path / "deployment", ProcessSet(tmp_path / "logs"), app=tmp_path)
    fed.prepare(["clinic-a", "clinic-b"])
    assert _mode(fed.coordinator) == 0o700
    assert {name: _mode(inst.directory) for name, inst in fed.institutions.items()} == {
        "clinic-a": 0o700, "clinic-b": 0o700}


def test_a_node_config_is_written_owner_only_even_over_a_readable_file(tmp_path):
    path = tmp_path / "node-config.toml"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, 'state-dir = "/srv/state"\n')
    assert _mode(path) == 0o600 and path.read_text() == 'state-dir = "/srv/state"\n'


def test_a_reopened_deployment_keeps_each_institutions_policy_but_not_its_old_paths(tmp_path):
    """A review: the node config saved under the old location pinned `state-dir` there, so a moved run
    directory's institutions would have trained on (or made) state elsewhere."""
    fed = LocalFederation(tmp_path / "old" / "deployment", ProcessSet(tmp_path / "logs"), app=tmp_path)
    fed.prepare(["clinic-a"])
    write_private(fed.institutions["clinic-a"].node_config, 'client-name = "clinic-a"\nstate-dir = "/old/state"\n'
                                                             'epsilon-budget = 4.0\npartition-id = 0\n')
    (tmp_path / "old").rename(tmp_path / "new")
    moved = LocalFederation(tmp_path / "new" / "deployment", ProcessSet(tmp_path / "logs"), app=tmp_path)
    moved.reopen(["clinic-a"])
    assert moved.saved_node_config("clinic-a") == {"epsilon-budget": 4.0, "partition-id": 0}


def test_registering_a_key_the_database_holds_keeps_its_id_and_every_id_is_kept_at_once(tmp_path, monkeypatch):
    """A reopened SuperLink refuses to register a key again ("Public key already in use"); the id comes
    from node-ids.json, or from the run's checkpoints for a deployment made before that file. An id is
    written as soon as it is known, so a later failure loses no registration."""
    import json

    import pytest

    from fedtune.deploy.local import KEY_IN_USE, NODE_IDS, DeployError

    fed = LocalFederation(tmp_path / "deployment", ProcessSet(tmp_path / "logs"), app=tmp_path)
    fed.prepare(["clinic-a", "clinic-b", "clinic-c"])

    def flwr(self, *args, **kwargs):
        name = args[args.index("--name") + 1]
        if name == "clinic-a":
            raise DeployError(f"flwr reported a failure: {KEY_IN_USE}.")
        if name == "clinic-c":
            raise DeployError("the SuperLink stopped")
        return '{"success": true, "node-id": "22"}'

    monkeypatch.setattr(LocalFederation, "flwr", flwr)
    with pytest.raises(DeployError, match="stopped"):
        fed.register(["clinic-a", "clinic-b", "clinic-c"], known={"clinic-a": 11})
    assert json.loads((fed.coordinator / NODE_IDS).read_text()) == {"clinic-a": 11, "clinic-b": 22}
    assert fed.register(["clinic-a", "clinic-b"]) == {"clinic-a": 11, "clinic-b": 22}, "from node-ids.json"
    with pytest.raises(DeployError, match=KEY_IN_USE):
        LocalFederation(tmp_path / "other", ProcessSet(tmp_path / "logs"), app=tmp_path).register(["clinic-a"])


def test_a_node_config_cut_short_by_a_crash_while_rewriting_keeps_the_institutions_limits(tmp_path, monkeypatch):
    """A review: the node config (the institution's privacy policy) was rewritten in place on every start,
    `--resume` included; a crash mid-write left an empty file, which reads as no limits at all."""
    import fedtune.durable as durable

    path = tmp_path / "node-config.toml"
    write_private(path, 'epsilon-budget = 4.0\n')

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(durable.os, "replace", crash)
    try:
        write_private(path, 'epsilon-budget = 4.0\nmax-delta = 1e-5\n')
    except KeyboardInterrupt:
        pass
    assert path.read_text() == 'epsilon-budget = 4.0\n' and _mode(path) == 0o600


def test_a_cut_short_superexec_secret_is_replaced_not_reused(tmp_path):
    from fedtune.deploy.local import SECRET_BYTES, kept_secret

    secret = tmp_path / "superexec.secret"
    secret.write_bytes(b"")  # a crash between creating the file and writing it
    assert kept_secret(secret).read_bytes() != b"" and secret.stat().st_size == SECRET_BYTES
    assert _mode(secret) == 0o600
    whole = secret.read_bytes()
    assert kept_secret(secret).read_bytes() == whole, "a whole secret is kept"
