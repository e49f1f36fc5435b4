"""Which institution each node is: the name its key was registered under, not the name it states.

With SuperNode authentication on, a node's id is tied to the public key it signs with, and the
SuperLink keeps the name the operator gave at `flwr supernode register ... --name clinic-a`. A
node's own `client-name` (node config) is only a claim. flwr 1.42's Control API does not
authenticate its callers (docs/deployment.md, "Security"), so anyone who can reach it can register
a key under an existing name, or unregister another node. The server therefore:
- excludes from every round each node whose registered name is also registered on another node
  (it cannot tell the real institution from the impostor) and each node whose name is pinned to
  another key: the first key seen for a name is pinned in the checkpoint, and a later node with
  that name and another key is not the institution the ledger knows;
- refuses a reply whose stated name differs from its node's registered name;
- excludes a node registered without a name where the others have one (it could state any name).
Excluded nodes are sent nothing; the ledger records why. Simulated nodes have no registered names,
and every one of them is the coordinator's own, so none of this applies there.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune import constants as k


@dataclass(frozen=True)
class Registry:
    names: dict[int, str]  # node id -> registered name
    keys: dict[int, str]  # node id -> SHA-256 of its registered public key
    nameless: tuple[int, ...] = ()  # nodes registered without a name in a federation whose others have one

    @classmethod
    def of(cls, grid: Grid) -> Registry:
        every = list(grid.get_nodes())
        nodes = [info for info in every if info.name]
        # Where nodes are registered by name (a deployment), one without a name could state any institution's
        # name in its replies (misnamed accepts a node it cannot check); in simulation no node has one.
        nameless = tuple(info.node_id for info in every if not info.name) if nodes else ()
        return cls({info.node_id: info.name for info in nodes},
                   {info.node_id: hashlib.sha256(info.public_key).hexdigest() for info in nodes}, nameless)

    def exclusions(self, pins: dict[str, str]) -> dict[int, str]:
        """Nodes that must not take part, with the reason; pins new names' keys in `pins` (in place)."""
        shared = {name for name, count in Counter(self.names.values()).items() if count > 1}
        excluded = {node: ("it is registered without a name, while the others are registered by institution: "
                           "the coordinator registers each key with `flwr supernode register ... --name NAME`")
                    for node in self.nameless}
        for node, name in self.names.items():
            if name in shared:
                excluded[node] = (f"the name {name!r} is registered on more than one node; the coordinator must "
                                  "unregister the key it did not register (`flwr supernode list`)")
            elif pins.setdefault(name, self.keys[node]) != self.keys[node]:
                excluded[node] = (f"node {node} is registered as {name!r} with another key than the one {name!r} "
                                  "trained with before; re-register the institution's own key, or reset the run")
        return excluded

    def misnamed(self, reply: Message) -> str | None:
        """Why a successful reply's stated client name cannot be accepted from its node, or None."""
        registered = self.names.get(reply.metadata.src_node_id)
        stated = reply.content[k.CLIENT_INFO][k.CLIENT_NAME]
        if registered is not None and stated != registered:
            return f"states the name {stated!r}, but its key is registered as {registered!r}"
        return None
