"""Refuse malformed client replies before they reach aggregation.

In deployment a reply comes from another institution's process: a bug, a version mismatch or a
hostile client can send an update with missing or extra tensors, wrong shapes or dtypes, NaN or
Inf, or metrics the strategy cannot weigh by. Flower's FedAvg would then fail the whole round
(InconsistentMessageReplies) or, worse, average a NaN into the global model. Each check here names
what is wrong, so the round loop can record the client as failed with that reason and go on.

Every check is on what a reply carries, not on what it declares: each tensor is decoded (after its
byte size is checked, so a huge payload is never loaded), and its real shape, dtype and values are
compared with the global adapter's. Every reported number is checked for range and, under DP, for
agreement with the run's schedule (q and steps follow from n, the batch size and the epochs).

An update can also be well formed but far too large: beyond strategy.max_update_norm, or, when that
is not set and clients train with AdamW, beyond what AdamW can move in the steps the client reports
(`adam_bound`). Plain SGD has no such bound (DP-SGD's Gaussian noise is unbounded), so with
optimizer = sgd only strategy.max_update_norm applies. A liar who reports a consistent but inflated
n and steps loosens that bound; `bounded_weights` caps how much such a claim can weigh in the mean.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.models.lora_factors import lift, ranks, truncate
from fedtune.privacy.budget import poisson_schedule
from fedtune.privacy.ledger import LedgerEntry

MAX_LISTED = 3  # names shown in a reason before "and N more"
MAX_COUNT = 10**9  # records or steps a client may report: more is a corrupt or hostile figure
NPY_HEADER_BYTES = 4096  # a tensor's serialized bytes may exceed its values by at most this (the .npy header)
WEIGHT_CAP = 10  # no client weighs more than this many times the round's (lower) median example count
# AdamW (torch's betas 0.9, 0.999, no weight decay) moves one coordinate by at most lr x this in one step:
# |m_hat / sqrt(v_hat)| <= (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) by Cauchy-Schwarz on the two
# exponential averages (the supremum over the step count of the bias-corrected ratio).
ADAM_STEP_BOUND = (1 - 0.9) / math.sqrt((1 - 0.999) * (1 - 0.9 ** 2 / 0.999))

# What every reply must report: the ledger's privacy figures and the aggregation weight.
REQUIRED_METRICS = (k.NUM_EXAMPLES, k.TRAIN_LOSS, k.STEPS, k.SAMPLE_RATE, k.NOISE_MULTIPLIER,
                    k.MAX_GRAD_NORM, k.DELTA, k.EPSILON, k.EPSILON_OTHER)
NON_NEGATIVE = (k.NUM_EXAMPLES, k.STEPS, k.SAMPLE_RATE, k.NOISE_MULTIPLIER, k.MAX_GRAD_NORM, k.DELTA)
# What a reply may also report, each a finite number >= 0 that the server reads as one (the memory and
# byte counts of the round line, distributed DP's t); a list value (Flower's MetricRecord allows them)
# is refused.
OPTIONAL_METRICS = (k.DISTRIBUTED_MIN_HONEST, k.BYTES_UP, k.PEAK_RSS_MB, k.PID)  # others: for_aggregation
EVALUATE_METRICS = (k.NUM_EXAMPLES, k.EVAL_LOSS, k.EVAL_ACCURACY)  # an evaluate reply's, and only these
# Replies that carry metrics: trained (with an update), or declined, refused or failed after training
# (client/app.py) without one. Only `trained` replies are aggregated.
STATUSES = (k.STATUS_TRAINED, k.STATUS_DECLINED, k.STATUS_REFUSED, k.STATUS_FAILED)


@dataclass(frozen=True)
class Schedule:
    """What the run config says one client's round is, to check the figures a reply reports."""

    batch_size: int
    local_epochs: int
    adam_step: float | None = None  # AdamW: lr x ADAM_STEP_BOUND, one coordinate's largest move a step
    sample_rate: float = 0.0  # train.sample_rate: one step at that rate
    # Client-level DP with fixed clipping in each institution's mod, without SecAgg+: the L2 norm C each
    # update was clipped to (each client clips inside C by the rounding margin, client/mods.py), which the
    # noise is calibrated to. One over it (a ClientApp without the mod) is rejected and counts as zero.
    clipping_norm: float = math.inf
    # Client-side adaptive clipping: each trained reply must carry Flower's `norm_bit` (0 or 1), which its
    # wrapper reads from every reply to set the next round's norm; one reply without it fails the round
    # for everyone (flwr's AggregationError).
    norm_bit: bool = False

    @classmethod
    def of(cls, cfg: FedtuneConfig, learning_rate: float, proximal_mu: float,
           sent_clipping_norm: float | None = None) -> Schedule:
        """`sent_clipping_norm`: the norm this round's train messages asked the clients to clip to, which
        under adaptive clipping changes from round to round (fixed: dp.client_clipping_norm)."""
        # The proximal step pulls each coordinate back by lr·mu of its distance, which keeps the bound
        # only while lr·mu <= 1 (then it never overshoots the anchor).
        # Under SecAgg+ each reply carries the mean of the cohort's updates, not its own: no per-client bound.
        adam = cfg.train.optimizer == "adamw" and learning_rate * proximal_mu <= 1 and not cfg.dp.secagg
        client_side = cfg.dp.client_dp != "off" and cfg.dp.client_dp_side == "client"
        norm = cfg.dp.client_clipping_norm if sent_clipping_norm is None else sent_clipping_norm
        return cls(cfg.train.batch_size, cfg.train.local_epochs, learning_rate * ADAM_STEP_BOUND if adam else None,
                   cfg.train.sample_rate, norm if client_side and not cfg.dp.secagg else math.inf,
                   norm_bit=client_side and cfg.dp.client_dp == "adaptive")


def reply_problem(reply: Message, reference: ArrayRecord, max_update_norm: float = math.inf,
                  lower_rank: bool = False, schedule: Schedule | None = None,
                  global_arrays: ArrayRecord | None = None) -> str | None:
    """Why `reply` (a successful train reply) cannot be used, or None when it can. A trained reply
    must carry exactly the tensors of `reference`, in its order, with the same shapes and dtypes,
    all finite, and differ from it by at most `max_update_norm` (L2, over all tensors). With
    `lower_rank` (heterogeneous ranks) its LoRA tensors may share one lower rank instead; it is
    then compared with `reference` viewed at that rank, and its norm bound holds for what the
    aggregation makes of it: the reply lifted to the rank of `global_arrays`, whose B update is
    scaled by R/ρ (models/lora_factors.py::lift)."""
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
    problem = _metrics_problem(content.get(k.METRICS), trained=status == k.STATUS_TRAINED, schedule=schedule)
    if problem or status != k.STATUS_TRAINED:
        return problem
    if len(content.metric_records) != 1:  # Flower's aggregation takes exactly one from each reply
        return f"expected one MetricRecord `{k.METRICS}`, got {sorted(content.metric_records)}"
    if len(content.array_records) != 1 or not isinstance(content.get(k.ARRAYS), ArrayRecord):
        return f"expected one ArrayRecord `{k.ARRAYS}`, got {sorted(content.array_records) or 'none'}"
    bit = content[k.METRICS].get(k.NORM_BIT)
    if schedule is not None and schedule.norm_bit and (type(bit) not in (int, float) or bit not in (0, 1)):
        return (f"metric {k.NORM_BIT} is {bit!r}; under client-side adaptive clipping (dp.client_dp `adaptive`) "
                "every update must say whether it was clipped, 0 or 1 (Flower's adaptiveclipping_mod)")
    if lower_rank:
        reference, problem = _at_reply_rank(content[k.ARRAYS], reference)
        if problem:
            return problem
    problem = arrays_problem(content[k.ARRAYS], reference) or _unmoved(content[k.ARRAYS], reference)
    if problem:
        return problem
    bound, what = max_update_norm, f"strategy.max_update_norm = {max_update_norm:g}"
    if schedule is not None and schedule.clipping_norm < bound:
        bound, what = schedule.clipping_norm, (f"the clipping norm {schedule.clipping_norm:g} sent this round "
                                               "(dp.client_clipping_norm, adapted under dp.client_dp `adaptive`), "
                                               "which its client-side clipping should have held it to")
    arrays = content[k.ARRAYS]
    if bound < math.inf and lower_rank and global_arrays is not None:  # the update as it is aggregated
        arrays, reference = _lifted(arrays, global_arrays), global_arrays
    if bound == math.inf and schedule is not None and schedule.adam_step is not None:
        bound = adam_bound(schedule.adam_step, int(content[k.METRICS][k.STEPS]), reference)
        what = f"{bound:.4g}, the most AdamW can move it in the {int(content[k.METRICS][k.STEPS])} steps reported"
    if bound == math.inf:
        return None
    norm = update_norm(arrays, reference)
    if norm > bound:
        return f"update norm {norm:.4g} exceeds {what}"
    return None


def adam_bound(adam_step: float, steps: int, reference: ArrayRecord) -> float:
    """The largest L2 norm an AdamW client's update can have after `steps` steps: each of the d
    coordinates moves at most adam_step a step."""
    coordinates = sum(int(np.prod(reference[key].shape)) for key in reference.keys())
    return adam_step * steps * math.sqrt(coordinates)


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


def _lifted(arrays: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
    state = lift({key: arrays[key].numpy() for key in arrays.keys()},
                 {key: global_arrays[key].numpy() for key in global_arrays.keys()})
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in state.items()})


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
        problem = _tensor_problem(key, arrays[key], reference[key].numpy())
        if problem:
            return problem
    return None


def _tensor_problem(key: str, got: Array, want: np.ndarray) -> str | None:
    """Why the tensor a reply carries under `key` cannot stand for `want`: by its bytes and by the
    array they decode to, whatever shape and dtype the Array declares."""
    if not isinstance(got.data, bytes) or len(got.data) > want.nbytes + NPY_HEADER_BYTES:
        size = len(got.data) if isinstance(got.data, bytes) else "no"
        return f"{key} carries {size} bytes; a {tuple(want.shape)} {want.dtype} tensor needs {want.nbytes}"
    try:
        values = got.numpy()
    except Exception as err:  # noqa: BLE001 - any decoding failure makes the tensor unusable
        return f"{key} cannot be decoded ({type(err).__name__})"
    if values.shape != want.shape:
        return f"wrong shape for {key}: {values.shape}, expected {want.shape}"
    if values.dtype != want.dtype:
        return f"wrong dtype for {key}: {values.dtype}, expected {want.dtype}"
    if tuple(got.shape) != values.shape or got.dtype != str(values.dtype):
        return f"{key} declares {tuple(got.shape)} {got.dtype} but carries {values.shape} {values.dtype}"
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


def reported_spending(reply: Message, schedule: Schedule | None = None) -> tuple[str, MetricRecord] | None:
    """The client's name and privacy figures from a trained reply, when its client record and
    metrics are well formed (under DP, on the run's schedule), else None. A refused update was
    still trained: its client spent ε, and the ledger must say so even though the update is not
    aggregated."""
    info = reply.content.get(k.CLIENT_INFO)
    if (not isinstance(info, ConfigRecord) or k.CLIENT_NAME not in info.keys()
            or info.get(k.STATUS) != k.STATUS_TRAINED):
        return None
    metrics = reply.content.get(k.METRICS)
    if _metrics_problem(metrics, trained=True, schedule=schedule):
        return None
    return str(info[k.CLIENT_NAME]), metrics


def _metrics_problem(metrics: object, trained: bool, schedule: Schedule | None = None) -> str | None:
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
    for key in OPTIONAL_METRICS:
        value = metrics.get(key, 0)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
            return f"metric {key} is {value!r}, expected a finite number >= 0"
    for key in (k.NUM_EXAMPLES, k.STEPS, k.DISTRIBUTED_MIN_HONEST):
        if not float(metrics.get(key, 0)).is_integer() or metrics.get(key, 0) > MAX_COUNT:
            return f"metric {key} is {metrics[key]}, expected a whole number up to {MAX_COUNT:.0e}"
    if metrics[k.SAMPLE_RATE] > 1:
        return f"metric {k.SAMPLE_RATE} is {metrics[k.SAMPLE_RATE]}, expected a probability (<= 1)"
    noised = trained or metrics[k.STEPS] > 0  # a refused or failed reply that took steps is on the ledger too
    if metrics[k.DELTA] >= 1 or (noised and metrics[k.DELTA] <= 0 < metrics[k.NOISE_MULTIPLIER]):
        return f"metric {k.DELTA} is {metrics[k.DELTA]}, expected a δ in (0, 1)"
    if trained and metrics[k.NUM_EXAMPLES] <= 0:
        return f"trained but reports {k.NUM_EXAMPLES}={metrics[k.NUM_EXAMPLES]}: nothing to weigh the update by"
    if trained and schedule is not None and metrics[k.NOISE_MULTIPLIER] > 0:
        return _schedule_problem(metrics, schedule)
    return None


def _schedule_problem(metrics: Mapping[str, float], schedule: Schedule) -> str | None:
    """Under DP-SGD, q and the steps follow from n: q = 1/ceil(n/B), steps = epochs x ceil(n/B); or, with
    train.sample_rate, one step at that rate."""
    n = int(metrics[k.NUM_EXAMPLES])
    q, steps = poisson_schedule(n, schedule.batch_size, schedule.local_epochs, schedule.sample_rate)
    if not math.isclose(metrics[k.SAMPLE_RATE], q, rel_tol=1e-9) or metrics[k.STEPS] != steps:
        return (f"reports q = {metrics[k.SAMPLE_RATE]:.6g} and {int(metrics[k.STEPS])} steps for n = {n}; the run's "
                f"schedule gives q = {q:.6g} and {steps} steps")
    return None


def late_schedule_problem(entry: LedgerEntry, schedule: Schedule) -> str | None:
    """A late entry (spending of this run the ledger lacks) is held to the run's schedule, as the reply
    it stands for would have been."""
    if not entry.noise_multiplier:
        return None
    return _schedule_problem({k.NUM_EXAMPLES: entry.num_examples, k.SAMPLE_RATE: entry.sample_rate,
                              k.STEPS: entry.steps}, schedule)


def evaluation_problem(reply: Message) -> str | None:
    """Why an evaluate reply cannot be averaged, or None: it carries one MetricRecord holding exactly
    the example count (a whole number) and the loss and accuracy, each NaN (scores the institution's
    policy withholds) or in range. Nothing else reaches Flower's weighted mean, which fails the round on
    replies that disagree (and early stopping and the released round read the mean loss)."""
    content = reply.content
    metrics = content.get(k.METRICS)
    if len(content.metric_records) != 1 or not isinstance(metrics, MetricRecord):
        return f"expected one MetricRecord `{k.METRICS}`, got {sorted(content.metric_records)}"
    if set(metrics.keys()) != set(EVALUATE_METRICS):
        return f"metrics are {_listed(sorted(metrics.keys()))}, expected {_listed(list(EVALUATE_METRICS))}"
    values = {key: metrics[key] for key in EVALUATE_METRICS}
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in values.values()):
        return "a metric is not a number"
    n = values[k.NUM_EXAMPLES]
    if not (0 <= n <= MAX_COUNT and float(n).is_integer()):
        return f"metric {k.NUM_EXAMPLES} is {n}, expected a whole number up to {MAX_COUNT:.0e}"
    loss, accuracy = values[k.EVAL_LOSS], values[k.EVAL_ACCURACY]
    if not (math.isnan(loss) or 0 <= loss < math.inf) or not (math.isnan(accuracy) or 0 <= accuracy <= 1):
        return f"loss {loss} or accuracy {accuracy} out of range (NaN when withheld)"
    return None


def bounded_weights(replies: list[Message], keys: Iterable[str] | None = None) -> list[Message]:
    """The replies as aggregation sees them: a reported example count above WEIGHT_CAP x the round's
    lower median is counted as that much, so no claim counts for more than that (among about ten or fewer
    equal institutions it can still outweigh the rest: docs/deployment.md); with `keys`, each
    reply's metrics hold only those. The replies themselves (and the ledger's record of what each
    reported) are unchanged."""
    counts = [float(r.content[k.METRICS][k.NUM_EXAMPLES]) for r in replies]
    positive = [n for n in counts if n > 0]  # an evaluation of no records weighs nothing and sets no cap
    cap = WEIGHT_CAP * statistics.median_low(positive) if len(positive) >= 2 else math.inf
    keep = None if keys is None else set(keys)
    out = []
    for reply in replies:
        metrics = reply.content[k.METRICS]
        if metrics[k.NUM_EXAMPLES] > cap or (keep is not None and set(metrics.keys()) != keep):
            shown = {key: value for key, value in metrics.items() if keep is None or key in keep}
            metrics = MetricRecord({**shown, k.NUM_EXAMPLES: int(min(metrics[k.NUM_EXAMPLES], cap))})
            reply = copy.copy(reply)
            reply.content = RecordDict({**{key: reply.content[key] for key in reply.content.keys()},
                                        k.METRICS: metrics})
        out.append(reply)
    return out


def for_aggregation(trained: list[Message]) -> list[Message]:
    """The trained replies as the strategy aggregates them: weights bounded, and the metrics of each
    reduced to the keys every reply carries with a number (Flower's mean needs one key set; a reply
    with an extra or a missing key is neither rejected nor allowed to decide the others' set, as a
    majority vote once let the first of two replies do). Keys of Flower's own mods stay (the adaptive
    clipping mod's `norm_bit`, which its strategy wrapper reads)."""
    if not trained:
        return trained
    shared = set(trained[0].content[k.METRICS].keys())
    for reply in trained:
        metrics = reply.content[k.METRICS]
        shared &= {key for key, value in metrics.items() if isinstance(value, int | float)}
    return bounded_weights(trained, shared)


def reject_malformed(replies: Iterable[Message], reference: ArrayRecord, max_update_norm: float = math.inf,
                     sent: Mapping[int, ArrayRecord] | None = None, lower_rank: bool = False,
                     schedule: Schedule | None = None) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split a round's train replies into those fit to use and (reply, reason) for the others.
    Each reply is checked against what its node was sent (`sent`, by node id; `reference` for a
    node not in it): under heterogeneous ranks, not every node gets the global adapter as it is.

    Error replies pass through unchanged (they are failures already). Replies need not agree on their
    optional metric keys: for_aggregation gives the strategy only those every one carries."""
    kept: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for reply in replies:
        own = (sent or {}).get(reply.metadata.src_node_id, reference)
        problem = None if reply.has_error() else reply_problem(reply, own, max_update_norm, lower_rank, schedule,
                                                               reference)
        if problem:
            rejected.append((reply, problem))
        else:
            kept.append(reply)
    return kept, rejected


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


LATE_STATUSES = (k.STATUS_TRAINED, k.STATUS_REJECTED, k.STATUS_FAILED)  # the outcomes that took steps


def late_entry_problem(entry: LedgerEntry) -> str | None:
    """What is wrong with an entry a client reports for spending the ledger lacks, or None: it must
    be a round that took DP-SGD steps, with every figure the accountants need, each in its range,
    as a reply's own metrics are (_metrics_problem)."""
    if entry.status not in LATE_STATUSES or entry.round < 1 or entry.num_examples is None:
        return f"an entry with status {entry.status!r}, round {entry.round} and n = {entry.num_examples}"
    if entry.steps is None or not 1 <= entry.steps <= MAX_COUNT or not 1 <= entry.num_examples <= MAX_COUNT:
        return f"{entry.steps} steps over {entry.num_examples} records"
    figures = (entry.noise_multiplier, entry.max_grad_norm, entry.sample_rate, entry.delta)
    if any(value is None or not math.isfinite(value) or value < 0 for value in figures):
        return f"σ, C, q or δ missing, negative or not finite ({figures})"
    if not 0 < entry.sample_rate <= 1 or not 0 < entry.delta < 1 or entry.epsilon is None or entry.epsilon < 0:
        return f"q = {entry.sample_rate}, δ = {entry.delta}, ε = {entry.epsilon}"
    return None
