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
