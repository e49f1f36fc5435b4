"""Malformed updates are refused with a reason, one client at a time; the round goes on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtune import constants as k
from fedtune.server.validate import (
    ADAM_STEP_BOUND,
    Schedule,
    adam_bound,
    bounded_weights,
    evaluation_problem,
    for_aggregation,
    reject_malformed,
    reply_problem,
)

pytestmark = pytest.mark.usefixtures("in_flower_run")
SHAPES = {"lora_A": (4, 8), "lora_B": (8, 4), "head": (4,)}


def reference() -> ArrayRecord:
    return ArrayRecord({name: Array(np.zeros(shape, dtype=np.float32)) for name, shape in SHAPES.items()})


def metrics(**changes) -> dict:
    values = {k.NUM_EXAMPLES: 50, k.TRAIN_LOSS: 1.2, k.STEPS: 6, k.SAMPLE_RATE: 0.3, k.NOISE_MULTIPLIER: 1.0,
              k.MAX_GRAD_NORM: 1.0, k.DELTA: 1e-5, k.EPSILON: 2.5, k.EPSILON_OTHER: 2.7, k.BYTES_UP: 1000}
    values.update(changes)
    return {key: value for key, value in values.items() if value is not None}


def arrays(fill: float = 1.0, **overrides) -> ArrayRecord:
    tensors = {name: np.full(shape, fill, dtype=np.float32) for name, shape in SHAPES.items()}
    tensors.update(overrides)
    return ArrayRecord({name: Array(t) for name, t in tensors.items() if t is not None})


def reply(node: int, status: str = k.STATUS_TRAINED, update: ArrayRecord | None = None,
          metric_values: dict | None = None, info: dict | None = None) -> Message:
    instruction = Message(RecordDict({k.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
    content = RecordDict({k.METRICS: MetricRecord(metrics() if metric_values is None else metric_values),
                          k.CLIENT_INFO: ConfigRecord(info or {k.CLIENT_NAME: f"clinic-{node}", k.STATUS: status})})
    if status == k.STATUS_TRAINED and update is not False:
        content[k.ARRAYS] = update if update is not None else arrays()
    return Message(content, reply_to=instruction)


def test_a_well_formed_trained_reply_and_a_declined_one_are_kept():
    good = reply(1)
    declined = reply(2, status=k.STATUS_DECLINED, metric_values=metrics(**{k.NUM_EXAMPLES: 0, k.STEPS: 0}))
    kept, rejected = reject_malformed([good, declined], reference())
    assert kept == [good, declined] and rejected == []


@pytest.mark.parametrize("make, says", [
    (lambda: reply(1, update=arrays(head=None)), "missing head"),
    (lambda: reply(1, update=arrays(extra=np.zeros(3, dtype=np.float32))), "unexpected extra"),
    (lambda: reply(1, update=arrays(lora_A=np.zeros((8, 4), dtype=np.float32))), "wrong shape for lora_A"),
    (lambda: reply(1, update=arrays(head=np.zeros(4, dtype=np.float64))), "wrong dtype for head"),
    (lambda: reply(1, update=arrays(lora_B=np.full((8, 4), np.nan, dtype=np.float32))), "lora_B has NaN or Inf"),
    (lambda: reply(1, update=arrays(head=np.array([0, np.inf, 0, 0], dtype=np.float32))), "head has NaN or Inf"),
    (lambda: reply(1, update=False), "expected one ArrayRecord"),
    (lambda: reply(1, metric_values=metrics(**{k.NUM_EXAMPLES: 0})), "nothing to weigh the update by"),
    (lambda: reply(1, metric_values=metrics(**{k.NUM_EXAMPLES: math.nan})), "num-examples is nan"),
    (lambda: reply(1, metric_values=metrics(**{k.STEPS: -3})), "steps is -3"),
    (lambda: reply(1, metric_values=metrics(**{k.EPSILON: None})), "metrics lack epsilon"),
    (lambda: reply(1, metric_values=metrics(**{k.EPSILON: -1.0})), "epsilon is -1.0"),
    (lambda: reply(1, metric_values=metrics(**{k.EPSILON: [1.0, 2.0]})), "epsilon is not a number"),
    (lambda: reply(1, info={k.CLIENT_NAME: "x", k.STATUS: "hacked"}), "unknown status"),
    (lambda: reply(1, info={"who": "x"}), "naming the client"),
])
def test_each_kind_of_malformed_reply_is_rejected_with_its_reason(make, says):
    bad, good = make(), reply(2)
    kept, rejected = reject_malformed([bad, good], reference())
    assert kept == [good]
    assert len(rejected) == 1 and rejected[0][0] is bad
    assert says in rejected[0][1]


def test_error_replies_pass_through_untouched():
    instruction = Message(RecordDict(), dst_node_id=3, message_type="train")
    failed = Message(Error(code=0, reason="boom"), reply_to=instruction)
    kept, rejected = reject_malformed([failed], reference())
    assert kept == [failed] and rejected == []


def test_replies_that_differ_in_optional_metric_keys_are_all_aggregated_on_the_keys_they_share():
    """A majority vote on the key set let the first of two replies decide it: a hostile one with an extra
    key got the honest one rejected. No reply is rejected for its keys; the strategy sees the shared ones."""
    odd = reply(3, metric_values={**metrics(), "surprise": 1.0})
    short = reply(2, metric_values=metrics(**{k.BYTES_UP: None}))
    for replies in ([odd, reply(1)], [reply(1), short, odd]):
        with pytest.raises(Exception, match="same keys"):  # what Flower's FedAvg does with the raw replies
            FedAvg().aggregate_train(1, replies)
        kept, rejected = reject_malformed(replies, reference())
        assert kept == replies and rejected == []
        aggregated, summary = FedAvg().aggregate_train(1, for_aggregation(kept))
        assert "surprise" not in summary and (k.BYTES_UP in summary) == (short not in replies)
        assert odd.content[k.METRICS]["surprise"] == 1.0, "the reply itself is unchanged"
    # a key every reply carries as a number stays: Flower's adaptive clipping mod adds `norm_bit`, which its
    # strategy wrapper reads (a review: dropping it failed every round of adaptive client-side clipping)
    flagged = [reply(i, metric_values={**metrics(), "norm_bit": 1.0}) for i in (1, 2)]
    assert all(r.content[k.METRICS]["norm_bit"] for r in for_aggregation(flagged))


@pytest.mark.parametrize("changes", [
    {k.BYTES_UP: [1, 2]},
    {k.PEAK_RSS_MB: math.nan},
    {k.DISTRIBUTED_MIN_HONEST: math.inf},
    {k.DISTRIBUTED_MIN_HONEST: 2.5},
    {k.PID: -1},
])
def test_an_optional_metric_the_server_reads_must_be_a_finite_number(changes):
    """A review: a declined reply with t = NaN, or a list-valued byte count every reply shared, failed
    the round in the ledger or in Flower's mean, before the ledger was saved."""
    (key,) = changes
    for status in (k.STATUS_TRAINED, k.STATUS_DECLINED):
        _, rejected = reject_malformed([reply(1, status=status, metric_values=metrics(**changes))], reference())
        assert rejected and f"metric {key} is" in rejected[0][1]


def test_a_reply_with_a_second_metric_record_is_rejected():
    """Flower's aggregation requires exactly one MetricRecord a reply, and failed every round on it."""
    extra = reply(1)
    extra.content["zzz"] = MetricRecord({"a": 1.0})
    _, rejected = reject_malformed([extra, reply(2)], reference())
    assert len(rejected) == 1 and "expected one MetricRecord" in rejected[0][1]


def _evaluation(**values) -> Message:
    instruction = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    base = {k.NUM_EXAMPLES: 10, k.EVAL_LOSS: 0.7, k.EVAL_ACCURACY: 0.8}
    base.update(values)
    return Message(RecordDict({k.METRICS: MetricRecord({a: b for a, b in base.items() if b is not None})}),
                   reply_to=instruction)


@pytest.mark.parametrize("values, says", [
    ({k.EVAL_ACCURACY: None}, "expected"),
    ({"extra": 1.0}, "expected"),
    ({k.EVAL_LOSS: [0.1, 0.2]}, "not a number"),
    ({k.EVAL_LOSS: -math.inf}, "out of range"),
    ({k.EVAL_ACCURACY: 1.5}, "out of range"),
    ({k.NUM_EXAMPLES: 2.5}, "whole number"),
])
def test_an_evaluate_reply_is_checked_before_it_is_averaged(values, says):
    assert evaluation_problem(_evaluation()) is None
    assert evaluation_problem(_evaluation(**{k.EVAL_LOSS: math.nan, k.EVAL_ACCURACY: math.nan})) is None, \
        "NaN: scores the institution's policy withholds"
    problem = evaluation_problem(_evaluation(**values))
    assert problem and says in problem


def test_after_rejection_the_aggregate_is_finite_and_ignores_the_bad_update():
    poisoned = reply(3, update=arrays(lora_A=np.full((4, 8), np.nan, dtype=np.float32)))
    replies = [reply(1, update=arrays(1.0)), reply(2, update=arrays(3.0)), poisoned]
    raw, _ = FedAvg().aggregate_train(1, replies)
    assert np.isnan(raw["lora_A"].numpy()).all(), "without the check, one NaN update poisons the model"
    kept, _ = reject_malformed(replies, reference())
    aggregated, _ = FedAvg().aggregate_train(1, kept)
    for name in SHAPES:
        np.testing.assert_allclose(aggregated[name].numpy(), 2.0)


def test_reply_problem_accepts_what_the_client_app_sends():
    """The checks agree with the ClientApp's own reply: the real metric keys, a real adapter."""
    import torch
    from flwr.app import Context

    from fedtune.client.app import _report, _Round
    from fedtune.client.state import ClientState
    from fedtune.config import FedtuneConfig
    from fedtune.privacy.policy import PrivacyPolicy

    cfg = FedtuneConfig()
    state = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    update = ArrayRecord(torch_state_dict=state)
    report = _report(cfg, [(1.0, 0.1, 5)], num_examples=40, loss=0.9, steps=5, sample_rate=0.1,
                     bytes_up=update.count_bytes())
    instruction = Message(RecordDict(), dst_node_id=4, message_type="train")
    context = Context(run_id=1, node_id=4, node_config={}, state=RecordDict(), run_config={})
    round_ = _Round(instruction, context, cfg, "clinic-d", PrivacyPolicy(), server_round=1, num_examples=40)
    sent = round_.finish(ClientState(), k.STATUS_TRAINED, report, arrays=update)
    assert reply_problem(sent, ArrayRecord(torch_state_dict={n: torch.zeros_like(t) for n, t in state.items()})) is None


def test_tensors_in_another_order_are_rejected():
    """Flower's DP wrappers and FedAvgM pair tensors by position: lora_A and lora_B would swap roles."""
    swapped = ArrayRecord({name: arrays()[name] for name in reversed(list(SHAPES))})
    kept, rejected = reject_malformed([reply(1, update=swapped)], reference())
    assert kept == [] and "another order" in rejected[0][1]


def test_an_update_above_the_norm_bound_is_rejected_with_its_norm():
    # An update filled with f differs from the zero reference by f * sqrt(68) (4*8 + 8*4 + 4 entries).
    norm_of_one = math.sqrt(68)  # 8.246...
    small, large = reply(1, update=arrays(1.0)), reply(2, update=arrays(1.5))
    kept, rejected = reject_malformed([small, large], reference(), max_update_norm=10.0)
    assert kept == [small]
    assert rejected[0][0] is large
    assert rejected[0][1] == f"update norm {1.5 * norm_of_one:.4g} exceeds strategy.max_update_norm = 10"
    # the bound is on the update (reply minus the global adapter), not on the weights themselves
    shifted = ArrayRecord({name: Array(np.full(shape, 100.0, dtype=np.float32)) for name, shape in SHAPES.items()})
    kept, _ = reject_malformed([reply(3, update=arrays(100.5))], shifted, max_update_norm=0.5 * norm_of_one + 1e-3)
    assert len(kept) == 1
    kept, _ = reject_malformed([reply(3, update=arrays(100.5))], shifted, max_update_norm=0.5 * norm_of_one - 1e-3)
    assert kept == []


def _npy(values: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def lying(name: str, carried: np.ndarray, declared_shape=None, declared_dtype: str = "float32") -> ArrayRecord:
    """The adapter with `name` replaced by an Array that declares its reference shape and dtype but
    carries `carried` (a hostile client builds the bytes itself)."""
    fake = Array(dtype=declared_dtype, shape=declared_shape or SHAPES[name], stype="numpy.ndarray", data=_npy(carried))
    record = arrays()
    return ArrayRecord({key: fake if key == name else record[key] for key in record.keys()})


@pytest.mark.parametrize("carried, says", [
    (np.ones((8, 4), dtype=np.float32), "wrong shape for lora_A: (8, 4)"),  # would crash or broadcast in FedAvg
    (np.ones((4, 8), dtype=np.float64), "wrong dtype for lora_A: float64"),  # the global adapter would turn float64
    (np.ones((4, 8), dtype=np.float16), "wrong dtype for lora_A: float16"),
    (np.ones((1000, 1000), dtype=np.float32), "carries 4000128 bytes"),  # far larger than declared
])
def test_a_tensor_is_judged_by_what_it_carries_not_what_it_declares(carried, says):
    bad = reply(1, update=lying("lora_A", carried))
    assert tuple(bad.content[k.ARRAYS]["lora_A"].shape) == (4, 8), "it declares the right shape"
    _, rejected = reject_malformed([bad], reference())
    assert rejected and says in rejected[0][1]


def test_a_matching_declaration_with_other_bytes_is_refused():
    honest_shape = np.ones((4, 8), dtype=np.float32)
    kept, _ = reject_malformed([reply(1, update=lying("lora_A", honest_shape))], reference())
    assert kept, "bytes that decode to what was declared are fine"
    _, rejected = reject_malformed([reply(1, update=lying("lora_A", honest_shape, declared_dtype="float64"))],
                                   reference())
    assert "declares (4, 8) float64 but carries (4, 8) float32" in rejected[0][1]


@pytest.mark.parametrize("changes, says", [
    ({k.NUM_EXAMPLES: 1e300}, "whole number"),  # would dominate the example-weighted mean
    ({k.NUM_EXAMPLES: 40.5}, "whole number"),
    ({k.STEPS: 1e12}, "whole number"),
    ({k.SAMPLE_RATE: 1.5}, "probability"),
    ({k.DELTA: 1.0}, "δ in (0, 1)"),
    ({k.DELTA: 0.0}, "δ in (0, 1)"),
])
def test_every_reported_number_is_checked(changes, says):
    _, rejected = reject_malformed([reply(1, metric_values=metrics(**changes))], reference())
    assert rejected and says in rejected[0][1]


def test_under_dp_q_and_steps_must_follow_from_n():
    schedule = Schedule(batch_size=16, local_epochs=2)  # n = 50: ceil(50/16) = 4 batches, q = 1/4, 8 steps
    good = metrics(**{k.NUM_EXAMPLES: 50, k.SAMPLE_RATE: 0.25, k.STEPS: 8})
    kept, _ = reject_malformed([reply(1, metric_values=good)], reference(), schedule=schedule)
    assert kept
    inflated = metrics(**{k.NUM_EXAMPLES: 50_000, k.SAMPLE_RATE: 0.25, k.STEPS: 8})
    _, rejected = reject_malformed([reply(1, metric_values=inflated)], reference(), schedule=schedule)
    assert "the run's schedule gives q = 0.0003" in rejected[0][1]


def test_without_a_set_bound_adamw_bounds_the_update_norm():
    """A 1e30 update passed when the default bound was infinite; AdamW cannot move that far."""
    schedule = Schedule(batch_size=16, local_epochs=2, adam_step=3e-3 * ADAM_STEP_BOUND)
    steps = metrics(**{k.NUM_EXAMPLES: 50, k.SAMPLE_RATE: 0.25, k.STEPS: 8})
    bound = adam_bound(schedule.adam_step, 8, reference())  # 8 steps x 0.0218 x sqrt(68)
    assert bound == pytest.approx(8 * 3e-3 * 7.2703 * math.sqrt(68), rel=1e-4)
    kept, _ = reject_malformed([reply(1, update=arrays(0.9 * bound / math.sqrt(68)), metric_values=steps)],
                               reference(), schedule=schedule)
    assert kept
    _, rejected = reject_malformed([reply(1, update=arrays(1e30), metric_values=steps)], reference(),
                                   schedule=schedule)
    assert "the most AdamW can move it in the 8 steps reported" in rejected[0][1]


def test_adamws_coordinate_bound_holds_for_torch_adamw():
    """The bound's constant against torch itself: gradients built to push one coordinate hardest."""
    import torch
    worst = 0.0
    for pattern in ([0.0] * 200 + [1.0], [1e-6] * 500 + [1.0] * 3, [(-1.0) ** t * (1 + t % 7) for t in range(400)]):
        p = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0)
        for g in pattern:
            before = float(p)
            p.grad = torch.tensor([g])
            optimizer.step()
            worst = max(worst, abs(float(p) - before))
    assert 1.0 < worst <= ADAM_STEP_BOUND


def test_no_single_claim_outweighs_the_rest():
    replies = [reply(i, metric_values=metrics(**{k.NUM_EXAMPLES: n})) for i, n in enumerate((40, 60, 10**9))]
    bounded = bounded_weights(replies)
    assert [r.content[k.METRICS][k.NUM_EXAMPLES] for r in bounded] == [40, 60, 600]
    assert replies[2].content[k.METRICS][k.NUM_EXAMPLES] == 10**9, "the reply itself (and its ledger entry) keeps it"
    two = bounded_weights(replies[1:])  # with two clients the lower median is the honest one
    assert [r.content[k.METRICS][k.NUM_EXAMPLES] for r in two] == [60, 600]


def test_replies_of_no_records_set_no_weight_cap():
    """A review: evaluate replies [0, 500] capped the 500 at 10 x the lower median, 0, and Flower's mean fell
    back to an unweighted one that counted the empty evaluation's loss as half."""
    replies = [reply(i, metric_values=metrics(**{k.NUM_EXAMPLES: n})) for i, n in enumerate((0, 500))]
    assert [r.content[k.METRICS][k.NUM_EXAMPLES] for r in bounded_weights(replies)] == [0, 500]


def test_under_client_side_client_level_dp_an_update_beyond_the_clipping_norm_is_rejected():
    """A review's case: without SecAgg+ the server sees each update, yet never checked that the institution's
    clipping mod had held it to C; a ClientApp without the mod had its whole update released with noise
    calibrated to C. The server now rejects it (it counts as zero, like any rejected update)."""
    from fedtune.config import FedtuneConfig
    from fedtune.server.validate import Schedule

    norm_of_one = math.sqrt(68)
    clipped = {"dp.client_dp": "fixed", "dp.client_dp_side": "client", "dp.client_clipping_norm": norm_of_one,
               "dp.delta": 1e-3, "clients": 4, "train.batch_size": 16, "train.local_epochs": 2}  # reply()'s schedule
    schedule = Schedule.of(FedtuneConfig.from_flat(clipped), 0.1, 0.0)
    scheduled = metrics(**{k.NUM_EXAMPLES: 50, k.SAMPLE_RATE: 0.25, k.STEPS: 8})  # the schedule's q and steps
    within = reply(1, update=arrays(0.99), metric_values=scheduled)
    beyond = reply(2, update=arrays(1.5), metric_values=scheduled)
    kept, rejected = reject_malformed([within, beyond], reference(), schedule=schedule)
    assert kept == [within] and rejected[0][0] is beyond
    assert f"exceeds the clipping norm {norm_of_one:g} sent this round" in rejected[0][1]
    for other in ({"dp.client_dp_side": "server"}, {"dp.client_dp": "off"}):  # the server clips, or no client DP
        unclipped = Schedule.of(FedtuneConfig.from_flat({**clipped, **other}), 0.1, 0.0)
        assert len(reject_malformed([beyond], reference(), schedule=unclipped)[0]) == 1


def test_a_round_line_without_bytes_up_from_every_reply_is_written_not_a_key_error():
    """A hostile node's review: bytes_up is optional, so one reply without it drops it from the aggregated
    metrics (for_aggregation keeps the keys every reply has), and the round line's bytes_up raised KeyError,
    failing the round for everyone."""
    from types import SimpleNamespace

    from flwr.app import MetricRecord

    from fedtune.privacy.ledger import PrivacyLedger
    from fedtune.server.rounds import _round_row

    row = _round_row(1, SimpleNamespace(row=dict), MetricRecord({k.TRAIN_LOSS: 1.0}), None, PrivacyLedger("prv", True),
                     [], [], bytes_down=10)
    assert row["bytes_up"] == 0 and row["train_loss"] == 1.0


def test_under_client_side_adaptive_clipping_each_update_must_carry_its_norm_bit_and_stay_in_the_sent_norm():
    """A hostile node's review: under client-side adaptive clipping Flower's wrapper reads `norm_bit` from
    every reply and raises AggregationError when one lacks it, so one institution could fail every round for
    all. Such a reply is now refused (it counts as zero), as is one beyond the norm the round sent, which
    adapts from round to round and so is not dp.client_clipping_norm."""
    from fedtune.config import FedtuneConfig
    from fedtune.server.validate import Schedule

    norm_of_one = math.sqrt(68)
    adaptive = FedtuneConfig.from_flat({"dp.client_dp": "adaptive", "dp.client_dp_side": "client", "dp.delta": 1e-3,
                                        "dp.client_clipping_norm": 100.0,
                                        "clients": 4, "train.batch_size": 16, "train.local_epochs": 2})
    schedule = Schedule.of(adaptive, 0.1, 0.0, sent_clipping_norm=norm_of_one)
    scheduled = metrics(**{k.NUM_EXAMPLES: 50, k.SAMPLE_RATE: 0.25, k.STEPS: 8})
    bits = {1: 0, 2: 1, 3: None, 4: 2, 5: 0.5}
    replies = [reply(node, update=arrays(0.99),
                     metric_values={**scheduled, **({} if bit is None else {k.NORM_BIT: bit})})
               for node, bit in bits.items()]
    beyond = reply(6, update=arrays(1.5), metric_values={**scheduled, k.NORM_BIT: 1})
    kept, rejected = reject_malformed([*replies, beyond], reference(), schedule=schedule)
    assert [r.metadata.src_node_id for r in kept] == [1, 2]
    assert [r.metadata.src_node_id for r, _ in rejected] == [3, 4, 5, 6]
    assert all(k.NORM_BIT in why for _, why in rejected[:3])
    assert f"exceeds the clipping norm {norm_of_one:g} sent this round" in rejected[3][1]
    for other in ({"dp.client_dp": "fixed"}, {"dp.client_dp_side": "server"}):  # no norm_bit asked of a client
        plain = Schedule.of(FedtuneConfig.from_flat({**adaptive.to_flat(), **other}), 0.1, 0.0)
        assert not plain.norm_bit and reply_problem(replies[2], reference(), schedule=plain) is None


@pytest.mark.parametrize("status", [k.STATUS_REFUSED, k.STATUS_FAILED, k.STATUS_DECLINED])
def test_a_reply_that_took_noised_steps_needs_a_delta_whatever_its_status(status):
    """A review: δ = 0 with σ > 0 was refused only on trained replies, so a `failed` reply with 4 steps and δ = 0 went
    into the ledger, which every reader then refused as damaged (the run crashed after its last round)."""
    from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger

    values = metrics(**{k.DELTA: 0.0})
    bad = reply(1, status=status, metric_values=values)
    kept, rejected = reject_malformed([bad], reference())
    assert kept == [] and "δ" in rejected[0][1]
    no_steps = reply(2, status=status, metric_values=metrics(**{k.DELTA: 0.0, k.STEPS: 0}))
    assert reject_malformed([no_steps], reference())[0] == [no_steps], "no step: no δ needed"
    with pytest.raises(ValueError, match="delta"):  # what the ledger would have held
        PrivacyLedger.from_dict({"accountant": "prv", "dp_enabled": True, "clients": {"a": [
            LedgerEntry.from_report(1, status, values, "prv").to_dict()]}})
