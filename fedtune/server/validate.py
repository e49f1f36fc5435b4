"""Refuse malformed client replies before they reach aggregation.

In deployment a reply comes from another institution's process: a bug, a version mismatch or a
hostile client can send an update with missing or extra tensors, wrong shapes or dtypes, NaN or
Inf, or metrics the strategy cannot weigh by. Flower's FedAvg would then fail the whole round
(InconsistentMessageReplies) or, worse, average a NaN into the global model. An update can also be
well formed but far too large (strategy.max_update_norm). Each check here names what is wrong, so
the round loop can record the client as failed with that reason and go on with the others.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedtune import constants as k
from fedtune.models.lora_factors import ranks, truncate

MAX_LISTED = 3  # names shown in a reason before "and N more"

# What every reply must report: the ledger's privacy figures and the aggregation weight.
REQUIRED_METRICS = (k.NUM_EXAMPLES, k.TRAIN_LOSS, k.STEPS, k.SAMPLE_RATE, k.NOISE_MULTIPLIER,
                    k.MAX_GRAD_NORM, k.DELTA, k.EPSILON, k.EPSILON_OTHER)
NON_NEGATIVE = (k.NUM_EXAMPLES, k.STEPS, k.SAMPLE_RATE, k.NOISE_MULTIPLIER, k.MAX_GRAD_NORM, k.DELTA)
# Replies that carry metrics: trained (with an update), or declined, refused or failed after training
# (client/app.py) without one. Only `trained` replies are aggregated.
STATUSES = (k.STATUS_TRAINED, k.STATUS_DECLINED, k.STATUS_REFUSED, k.STATUS_FAILED)
MAX_REASON = 500  # characters of a client's reason kept in the ledger


def reply_problem(reply: Message, reference: ArrayRecord, max_update_norm: float = math.inf,
                  lower_rank: bool = False) -> str | None:
    """Why `reply` (a successful train reply) cannot be used, or None when it can. A trained reply
    must carry exactly the tensors of `reference`, in its order, with the same shapes and dtypes,
    all finite, and differ from it by at most `max_update_norm` (L2, over all tensors). With
    `lower_rank` (heterogeneous ranks) its LoRA tensors may share one lower rank instead; it is
    then compared with `reference` viewed at that rank."""
    content = reply.content
    info = content.get(k.CLIENT_INFO)
    if not isinstance(info, ConfigRecord) or not {k.CLIENT_NAME, k.STATUS} <= set(info.keys()):
        return f"no `{k.CLIENT_INFO}` record naming the client and its status"
    status = info[k.STATUS]
    if status not in STATUSES:
        return f"unknown status {status!r}"
    if not isinstance(info[k.CLIENT_NAME], str) or not info[k.CLIENT_NAME].strip():
        return "the client's name is not a non-empty string"
    if not isinstance(info.get(k.REASON, ""), str):
        return f"`{k.REASON}` is not a string"
    problem = _metrics_problem(content.get(k.METRICS), trained=status == k.STATUS_TRAINED)
    if problem or status != k.STATUS_TRAINED:
        return problem
    if len(content.array_records) != 1 or not isinstance(content.get(k.ARRAYS), ArrayRecord):
        return f"expected one ArrayRecord `{k.ARRAYS}`, got {sorted(content.array_records) or 'none'}"
    if lower_rank:
        reference, problem = _at_reply_rank(content[k.ARRAYS], reference)
        if problem:
            return problem
    problem = arrays_problem(content[k.ARRAYS], reference) or _unmoved(content[k.ARRAYS], reference)
    if problem or max_update_norm == math.inf:
        return problem
    norm = update_norm(content[k.ARRAYS], reference)
    if norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds strategy.max_update_norm = {max_update_norm:g}"
    return None


def _at_reply_rank(arrays: ArrayRecord, reference: ArrayRecord) -> tuple[ArrayRecord, str | None]:
    """`reference` at the rank of the reply's LoRA tensors (models/lora_factors.py: what a client of
    that rank makes of what it was sent), or a reason when that rank is not one usable rank."""
    sent = ranks((key, tuple(reference[key].shape)) for key in reference.keys())
    found = ranks((key, tuple(arrays[key].shape)) for key in arrays.keys() if key in reference)
    if len(sent) != 1 or not found:
        return reference, None  # no LoRA tensors to compare: the usual checks name what is wrong
    (sent_rank,) = sent
    if len(found) > 1:
        return reference, f"LoRA tensors of different ranks {sorted(found)}; expected one rank"
    (rank,) = found
    if not 1 <= rank <= sent_rank:
        return reference, f"LoRA rank {rank}, expected 1 to {sent_rank} (the rank this client was sent)"
    if rank == sent_rank:
        return reference, None
    view = truncate({key: array.numpy() for key, array in reference.items()}, rank)
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in view.items()}), None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of arrays - reference over all tensors, in float64 (a float32 sum of squares can
    overflow or lose the small entries)."""
    total = 0.0
    for key in reference.keys():
        diff = arrays[key].numpy().astype(np.float64) - reference[key].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def arrays_problem(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why `arrays` does not fit `reference` (keys, shapes, dtypes, finite values), or None."""
    missing = [key for key in reference.keys() if key not in arrays]
    extra = [key for key in arrays.keys() if key not in reference]
    if missing or extra:
        parts = [f"missing {_listed(missing)}"] if missing else []
        parts += [f"unexpected {_listed(extra)}"] if extra else []
        return f"wrong tensors: {'; '.join(parts)}"
    if list(arrays.keys()) != list(reference.keys()):
        # Flower's DP wrappers and FedAvgM pair an update's tensors with the global ones by position.
        return "tensors in another order than the global adapter's"
    for key in reference.keys():
        got, want = arrays[key], reference[key]
        if tuple(got.shape) != tuple(want.shape):
            return f"wrong shape for {key}: {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"wrong dtype for {key}: {got.dtype}, expected {want.dtype}"
        try:
            values = got.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure makes the tensor unusable
            return f"{key} cannot be decoded ({type(err).__name__})"
        if not np.isfinite(values).all():
            return f"{key} has NaN or Inf values"
    return None


def _unmoved(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Fail closed (Opacus #820): a reply that says it trained but carries its LoRA matrices exactly
    as they were sent comes from training that never reached them; it is not averaged."""
    lora = [key for key in reference.keys() if "lora_" in key]
    if lora and all(np.array_equal(arrays[key].numpy(), reference[key].numpy()) for key in lora):
        return "says it trained, but no LoRA weight changed (Opacus issue #820); the update is not used"
    return None


def reported_spending(reply: Message) -> tuple[str, MetricRecord] | None:
    """The client's name and privacy figures from a trained reply, when its client record and
    metrics are well formed, else None. A refused update was still trained: its client spent ε,
    and the ledger must say so even though the update is not aggregated."""
    info = reply.content.get(k.CLIENT_INFO)
    if (not isinstance(info, ConfigRecord) or k.CLIENT_NAME not in info.keys()
            or info.get(k.STATUS) != k.STATUS_TRAINED):
        return None
    metrics = reply.content.get(k.METRICS)
    if _metrics_problem(metrics, trained=True):
        return None
    return str(info[k.CLIENT_NAME]), metrics


def _metrics_problem(metrics: object, trained: bool) -> str | None:
    if not isinstance(metrics, MetricRecord):
        return f"no MetricRecord `{k.METRICS}`"
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing:
        return f"metrics lack {_listed(missing)}"
    for key in REQUIRED_METRICS:
        value = metrics[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {key} is not a number"
        if key in NON_NEGATIVE and not (value >= 0 and math.isfinite(value)):
            return f"metric {key} is {value}, expected a finite number >= 0"
        if key in (k.EPSILON, k.EPSILON_OTHER) and (math.isnan(value) or value < 0):
            return f"metric {key} is {value}, expected >= 0 (inf when DP is off)"
    if trained and metrics[k.NUM_EXAMPLES] <= 0:
        return f"trained but reports {k.NUM_EXAMPLES}={metrics[k.NUM_EXAMPLES]}: nothing to weigh the update by"
    return None


def reject_malformed(replies: Iterable[Message], reference: ArrayRecord, max_update_norm: float = math.inf,
                     sent: Mapping[int, ArrayRecord] | None = None,
                     lower_rank: bool = False) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split a round's train replies into those fit to use and (reply, reason) for the others.
    Each reply is checked against what its node was sent (`sent`, by node id; `reference` for a
    node not in it): under heterogeneous ranks, not every node gets the global adapter as it is.

    Error replies pass through unchanged (they are failures already). Besides each reply's own
    checks, trained replies must agree on their metric keys, as Flower's aggregation requires:
    a reply whose keys differ from the most common set is rejected, not the round."""
    kept: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for reply in replies:
        own = (sent or {}).get(reply.metadata.src_node_id, reference)
        problem = None if reply.has_error() else reply_problem(reply, own, max_update_norm, lower_rank)
        if problem:
            rejected.append((reply, problem))
        else:
            kept.append(reply)
    trained = [r for r in kept if not r.has_error() and r.content[k.CLIENT_INFO][k.STATUS] == k.STATUS_TRAINED]
    if trained:
        usual, _ = Counter(frozenset(r.content[k.METRICS].keys()) for r in trained).most_common(1)[0]
        for reply in trained:
            keys = frozenset(reply.content[k.METRICS].keys())
            if keys != usual:
                kept.remove(reply)
                detail = [f"extra {_listed(sorted(keys - usual))}"] if keys - usual else []
                detail += [f"lacks {_listed(sorted(usual - keys))}"] if usual - keys else []
                rejected.append((reply, f"metric keys differ from the other clients' ({'; '.join(detail)})"))
    return kept, rejected


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"
