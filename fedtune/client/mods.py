"""Client mods: the client half of server-side strategy wrappers.

`client_clipping_mod` pairs with Flower's client-side client-level DP wrappers
(strategies/client_dp.py): it clips this institution's update to the norm the server sent,
using Flower's own `fixedclipping_mod` / `adaptiveclipping_mod`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedtune import constants as k

MARGIN_WARNING = 0.1  # warn when the rounding margin takes more than this share of the clipping norm


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
    # Clip a little inside C, so that the update as the server sums it (rounded to float32, and by SecAgg+)
    # still has norm at most C, the norm its noise is calibrated to.
    arrays, norm = next(iter(msg.content.array_records.values())), float(config[k.CLIPPING_NORM])
    margin = rounding_bound(arrays, norm, bool(config.get(k.SECAGG)))
    if margin > MARGIN_WARNING * norm:
        warnings.warn(f"client-level DP: the rounding of {_size(arrays):,} values (SecAgg+'s, float32's) takes "
                      f"{min(margin / norm, 1):.0%} of the clipping norm {norm:g} (dp.client_clipping_norm), so "
                      "updates are clipped that much harder; a larger norm, or fewer trained values, keeps more "
                      "of them.", stacklevel=2)
    config[k.CLIPPING_NORM] = max(0.0, norm - margin)
    flower_mod = adaptiveclipping_mod if config.get(k.CLIENT_DP) == "adaptive" else fixedclipping_mod
    with flower_logs_quiet():
        return flower_mod(msg, context, lambda _msg, _context: reply)


def rounding_bound(arrays: ArrayRecord, clipping_norm: float, secagg: bool) -> float:
    """The most rounding can move a clipped update of these d values on its way into the server's sum,
    in L2 norm, √d times the most per value: the sent weights θ + Δ are float32, so each is off by at
    most half a float32 spacing at |θ| + C (a whole spacing is taken, to spare a float32 difference
    anywhere after); SecAgg+'s stochastic rounding moves each by less than one quantization step,
    2·range / levels (without this margin a review bounded the update at 1.02·C for d = 74,000, C = 0.05)."""
    values = [array.numpy() for array in arrays.values()]
    d = _size(arrays)
    largest = max((float(np.max(np.abs(value), initial=0.0)) for value in values), default=0.0)
    per_value = float(np.spacing(np.float32(largest + clipping_norm)))
    if secagg:
        per_value += 2 * k.SECAGG_CLIPPING_RANGE / k.SECAGG_QUANTIZATION_RANGE
    return math.sqrt(d) * per_value


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


def _size(arrays: ArrayRecord) -> int:
    return sum(int(np.prod(array.shape)) for array in arrays.values())
