"""The client half of SecAgg+ (server/secagg.py): Flower's `secaggplus_mod` around our train handler.

Flower 1.42's `secaggplus_mod` speaks the legacy API: in its masking stage it calls the app with
a FitIns-shaped message and masks the FitRes-shaped reply. `secagg_mod` translates both ways,
so the train handler (and the client-level DP clipping mod inside it) sees its usual message.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

from fedtune import constants as k
from fedtune.client.mods import flower_logs_quiet

FITINS_PARAMETERS, FITINS_CONFIG = "fitins.parameters", "fitins.config"  # Flower's legacy record names
DDP_KEY = "dp.distributed_min_honest"  # in the round's config
DDP_STATE, MIN_HONEST = "fedtune.distributed_dp", "min_honest"  # kept in the client's context between stages


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ stages when the server drives them; any other message passes through.

    Registered unconditionally (mods are fixed when the ClientApp is built), so it must not get
    in the way of normal rounds: Flower's mod raises on a train message without its configs."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        _refuse_a_share_in_the_clear(msg)
        return call_next(msg, context)
    _refuse_too_few_noise_shares(msg.content.config_records[RECORD_KEY_CONFIGS], context)
    _refuse_to_train_for_a_sum_never_unmasked(msg)
    with flower_logs_quiet():
        return secaggplus_mod(msg, context, lambda legacy, ctx: _train_as_legacy(legacy, ctx, call_next))


def _refuse_a_share_in_the_clear(msg: Message) -> None:
    """Distributed DP: an institution adds only σ/√t of the noise, and only SecAgg+'s masks keep that
    share from the coordinator. A train message that asks for distributed DP outside SecAgg+'s stages
    would have it sent in the clear: refused before any training, so nothing is spent."""
    config = msg.content.config_records.get(k.CONFIG)
    if config is not None and config.get(DDP_KEY):
        raise RuntimeError("distributed DP (dp.distributed_min_honest) asks this institution to add only a share "
                           "of the noise, which SecAgg+ must hide, but this train message came outside SecAgg+; "
                           "not training.")


def _refuse_too_few_noise_shares(configs: ConfigRecord, context: Context) -> None:
    """Distributed DP: in the unmask stage, refuse to help remove the masks of a sum that holds fewer
    than t institutions' noise shares (dp.distributed_min_honest, kept when this client submitted):
    unmasked, it would carry less noise than σ. Without those shares the server never learns the sum."""
    if configs.get(Key.STAGE) != Stage.UNMASK or DDP_STATE not in context.state.config_records:
        return
    needed = int(context.state.config_records[DDP_STATE][MIN_HONEST])
    active = len(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    if active < needed:
        raise RuntimeError(f"distributed DP: only {active} institutions' noise shares are in the sum, fewer than "
                           f"the {needed} (dp.distributed_min_honest) each institution's ε assumes; not unmasking.")


def _refuse_to_train_for_a_sum_never_unmasked(msg: Message) -> None:
    """Distributed DP: in the masking stage, before training, refuse when fewer than t institutions
    (this one included) are left after key sharing: every honest one would refuse to unmask that sum,
    so training would spend ε for an update nobody gets. Under the complete graph fedtune sets up
    (server/secagg.py, NUM_SHARES = 1), every other institution left sent this one a ciphertext."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    legacy = msg.content.config_records.get(FITINS_CONFIG)
    if configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS or legacy is None or not legacy.get(DDP_KEY):
        return
    needed, left = int(legacy[DDP_KEY]), len(configs.get(Key.CIPHERTEXT_LIST, [])) + 1
    if left < needed:
        raise RuntimeError(f"distributed DP: only {left} institutions are left after key sharing, fewer than the "
                           f"{needed} (dp.distributed_min_honest) whose noise shares the sum needs; the sum would "
                           "never be unmasked, so not training (nothing spent).")


def secagg_range(context: Context) -> int:
    """The quantization range Q this round's SecAgg+ set up (sent by the server's workflow): the grid
    a distributed-DP share must lie on (privacy/distributed.py)."""
    return int(context.state.config_records[RECORD_KEY_STATE]["target_range"])


def _train_as_legacy(legacy: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """FitIns-shaped message -> our train handler -> FitRes-shaped reply for secaggplus_mod to mask."""
    config = legacy.content.config_records[FITINS_CONFIG]
    if config.get(DDP_KEY):
        context.state.config_records[DDP_STATE] = ConfigRecord({MIN_HONEST: int(config[DDP_KEY])})
    names = list(config[k.ARRAY_NAMES])
    received = legacy.content.array_records[FITINS_PARAMETERS]
    arrays = ArrayRecord({name: Array(a.numpy()) for name, a in zip(names, received.values(), strict=True)})
    # The same message (its id, sender and round), in the shape the train handler reads.
    legacy.content = RecordDict({k.ARRAYS: arrays,
                                 k.CONFIG: ConfigRecord({key: v for key, v in config.items() if key != k.ARRAY_NAMES})})
    reply = call_next(legacy, context)
    if reply.has_error():
        raise RuntimeError(f"training failed before secure aggregation: {reply.error.reason}")
    # A client that declined submits the global adapter (a zero update): SecAgg+ then never
    # depends on who trained, and the server's sum stays a sum over the trained updates.
    submitted = reply.content.array_records.get(k.ARRAYS, arrays)
    _check_range(submitted, float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"]))
    return Message(fitres_to_recorddict(to_fit_res(submitted, reply), keep_input=True), reply_to=legacy)


def to_fit_res(arrays: ArrayRecord, reply: Message) -> FitRes:
    """Our reply as the legacy FitRes secaggplus_mod masks: parameters in the server's order,
    weight 1 (one institution, one vote), metrics and CLIENT_INFO in plaintext."""
    info = {k.SECAGG_INFO_PREFIX + key: str(v) for key, v in reply.content[k.CLIENT_INFO].items()}
    metrics = {**dict(reply.content[k.METRICS]), **info}
    return FitRes(Status(Code.OK, ""), arrayrecord_to_parameters(arrays, keep_input=True), 1, metrics)


def _check_range(arrays: ArrayRecord, clipping_range: float) -> None:
    """SecAgg+ quantizes every value into [-range, range] and clips what falls outside: refuse instead."""
    largest = max(float(np.abs(a.numpy()).max(initial=0.0)) for a in arrays.values())
    if largest > clipping_range:
        raise ValueError(f"An adapter value of magnitude {largest:.3g} is outside SecAgg+'s quantization range "
                         f"±{clipping_range}; it would be clipped, so this client does not submit.")
