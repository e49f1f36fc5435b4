"""Client mods: the client half of server-side strategy wrappers.

`client_clipping_mod` pairs with Flower's client-side client-level DP wrappers
(strategies/client_dp.py): it clips this institution's update to the norm the server sent,
using Flower's own `fixedclipping_mod` / `adaptiveclipping_mod`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedtune import constants as k


def client_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the update when, and only when, the server asked for client-side clipping.

    Why not register Flower's mod directly: mods are fixed when the module-level ClientApp is
    built, but whether a run clips on the client is the server's choice, per message. Flower's
    mods answer an error when the config lacks `clipping_norm` (every run without client-side
    clipping) and when the reply carries no arrays (a client that declined, ε budget spent).
    So: no key, pass through; declined or failed, pass the reply through untouched; otherwise
    run Flower's mod over the reply we already have."""
    config = msg.content.config_records.get(k.CONFIG)
    if config is None or k.CLIPPING_NORM not in config:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or not reply.content.array_records:
        return reply
    flower_mod = adaptiveclipping_mod if config.get(k.CLIENT_DP) == "adaptive" else fixedclipping_mod
    with flower_logs_quiet():
        return flower_mod(msg, context, lambda _msg, _context: reply)


@contextmanager
def flower_logs_quiet() -> Iterator[None]:
    """Flower's mods log every clip and protocol stage at INFO/DEBUG, several lines per client
    per round in the user's terminal; keep their warnings and errors only."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
