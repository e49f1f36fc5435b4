"""A node is the institution its key was registered as, not the name it states (server/identity.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedtune import constants as k
from fedtune.server.identity import Registry

pytestmark = pytest.mark.usefixtures("flower_run")


def grid(*nodes: tuple[int, str, bytes]):
    infos = [SimpleNamespace(node_id=node, name=name, public_key=key) for node, name, key in nodes]
    return SimpleNamespace(get_nodes=lambda: infos)


def test_a_name_registered_on_two_nodes_excludes_both():
    """The review's hostile outsider: its own key registered under the name clinic-a."""
    registry = Registry.of(grid((1, "clinic-a", b"real"), (2, "clinic-b", b"b"), (3, "clinic-a", b"impostor")))
    excluded = registry.exclusions({})
    assert set(excluded) == {1, 3} and "more than one node" in excluded[3]


def test_a_name_seen_with_another_key_than_before_is_excluded():
    """The real clinic-a unregistered by the outsider, who then registers its own key as clinic-a."""
    pins: dict[str, str] = {}
    assert Registry.of(grid((1, "clinic-a", b"real"), (2, "clinic-b", b"b"))).exclusions(pins) == {}
    later = Registry.of(grid((3, "clinic-a", b"impostor"), (2, "clinic-b", b"b")))
    assert list(later.exclusions(pins)) == [3]
    assert Registry.of(grid((4, "clinic-a", b"real"))).exclusions(pins) == {}, "the real key on a new node id is fine"


def test_simulated_nodes_have_no_registered_names():
    registry = Registry.of(grid((1, "", b"x"), (2, "", b"y")))
    assert registry.names == {} and registry.exclusions({}) == {}


def test_a_reply_stating_another_institutions_name_is_refused():
    registry = Registry.of(grid((1, "clinic-a", b"a"), (2, "clinic-b", b"b")))
    instruction = Message(RecordDict({k.CONFIG: ConfigRecord({})}), dst_node_id=2, message_type="train")
    reply = Message(RecordDict({k.CLIENT_INFO: ConfigRecord({k.CLIENT_NAME: "clinic-a", k.STATUS: "trained"})}),
                    reply_to=instruction)
    assert "registered as 'clinic-b'" in registry.misnamed(reply)
