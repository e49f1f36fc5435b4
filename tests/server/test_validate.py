"""Malformed updates are refused with a reason, one client at a time; the round goes on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtune import constants as k
from fedtune.server.validate import reject_malformed, reply_problem

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


def test_a_reply_whose_metric_keys_differ_from_the_others_is_rejected_not_the_round():
    odd = reply(3, metric_values={**metrics(), "surprise": 1.0})
    replies = [reply(1), reply(2), odd]
    with pytest.raises(Exception, match="same keys"):  # what Flower's FedAvg does with the raw replies
        FedAvg().aggregate_train(1, replies)
    kept, rejected = reject_malformed(replies, reference())
    assert [r.metadata.src_node_id for r in kept] == [1, 2]
    assert rejected[0][0] is odd and "extra surprise" in rejected[0][1]
    FedAvg().aggregate_train(1, kept)  # the others aggregate


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
