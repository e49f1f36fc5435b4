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


def test_a_node_registered_without_a_name_among_named_ones_is_excluded():
    """A review: `flwr supernode register` takes `--name` as optional, and the Control API is open. A nameless
    node's stated name cannot be checked, so it could report as clinic-b, file figures under clinic-b's
    name and be sent clinic-b's spending history."""
    excluded = Registry.of(grid((1, "clinic-a", b"a"), (2, "clinic-b", b"b"), (3, "", b"outsider"))).exclusions({})
    assert list(excluded) == [3] and "registered without a name" in excluded[3]


def test_simulated_nodes_have_no_registered_names():
    registry = Registry.of(grid((1, "", b"x"), (2, "", b"y")))
    assert registry.names == {} and registry.exclusions({}) == {}


def test_a_reply_stating_another_institutions_name_is_refused():
    registry = Registry.of(grid((1, "clinic-a", b"a"), (2, "clinic-b", b"b")))
    instruction = Message(RecordDict({k.CONFIG: ConfigRecord({})}), dst_node_id=2, message_type="train")
    reply = Message(RecordDict({k.CLIENT_INFO: ConfigRecord({k.CLIENT_NAME: "clinic-a", k.STATUS: "trained"})}),
                    reply_to=instruction)
    assert "registered as 'clinic-b'" in registry.misnamed(reply)


def test_a_node_is_known_by_its_registered_name_before_it_ever_answers():
    """A registered node that died before its first reply used to appear in the ledger as an extra
    institution, `node-N`, beside its real name."""
    from flwr.app import Message, RecordDict

    from fedtune.privacy.ledger import PrivacyLedger
    from fedtune.server.identity import Registry
    from fedtune.server.rounds import NO_REPLY, failed_reply, name_registered, record_privacy

    registry = Registry({11: "clinic-a", 12: "clinic-b"}, {11: "k1", 12: "k2"})
    sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (11, 13)]
    names: dict[int, str] = {}
    name_registered(names, registry, [m.metadata.dst_node_id for m in sent])
    assert names == {11: "clinic-a"}  # 13 has no registration (simulation): it stays unnamed
    ledger = PrivacyLedger("rdp", True)
    reply = failed_reply(sent[0], NO_REPLY)
    reply.metadata.__dict__["_src_node_id"] = 11
    record_privacy(ledger, 1, [reply], names)
    assert list(ledger.clients) == ["clinic-a"]
