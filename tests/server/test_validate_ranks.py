"""Heterogeneous ranks: a reply at any one rank up to the rank its node was sent passes the
malformed-update check, compared with what was sent viewed at that rank; everything else is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import constants as k
from fedtune.models.lora_factors import truncate
from fedtune.server.validate import reject_malformed

pytestmark = pytest.mark.usefixtures("in_flower_run")
A, B, HEAD = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.head.weight"
RNG = np.random.default_rng(0)
GLOBAL = {A: RNG.normal(size=(8, 5)).astype(np.float32), B: RNG.normal(size=(6, 8)).astype(np.float32),
          HEAD: np.zeros(3, dtype=np.float32)}


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def reply(node: int, state: dict[str, np.ndarray]) -> Message:
    instruction = Message(RecordDict({k.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
    metrics = {k.NUM_EXAMPLES: 50, k.TRAIN_LOSS: 1.2, k.STEPS: 6, k.SAMPLE_RATE: 0.3, k.NOISE_MULTIPLIER: 1.0,
               k.MAX_GRAD_NORM: 1.0, k.DELTA: 1e-5, k.EPSILON: 2.5, k.EPSILON_OTHER: 2.7}
    return Message(RecordDict({k.ARRAYS: record(state), k.METRICS: MetricRecord(metrics),
                               k.CLIENT_INFO: ConfigRecord({k.CLIENT_NAME: f"c{node}", k.STATUS: k.STATUS_TRAINED})}),
                   reply_to=instruction)


def check(state: dict[str, np.ndarray], sent_rank: int = 8, lower_rank: bool = True,
          max_update_norm: float = math.inf, trained: bool = True) -> str | None:
    """The reason `state` is refused as a reply to a node sent the global adapter at `sent_rank`.
    `trained`: B moved a little, as training moves it (an unmoved reply is refused: fail closed)."""
    if trained:
        state = {name: value + np.float32(1e-3) if "lora_B" in name else value for name, value in state.items()}
    sent = {1: record(truncate(GLOBAL, sent_rank))}
    _, rejected = reject_malformed([reply(1, state)], record(GLOBAL), max_update_norm, sent, lower_rank)
    return rejected[0][1] if rejected else None


def test_a_reply_at_the_rank_sent_or_lower_is_kept():
    assert check(GLOBAL) is None
    assert check(truncate(GLOBAL, 4)) is None  # a node not yet known trains at its own rank
    assert check(truncate(GLOBAL, 2), sent_rank=4) is None


def test_a_lower_rank_is_refused_when_the_run_has_one_rank():
    assert "wrong shape" in check(truncate(GLOBAL, 4), lower_rank=False)


def test_a_higher_rank_than_sent_or_mixed_ranks_are_refused():
    assert "LoRA rank 8, expected 1 to 4" in check(GLOBAL, sent_rank=4)
    mixed = {**truncate(GLOBAL, 4), A: GLOBAL[A][:2]}
    assert "different ranks [2, 4]" in check(mixed)


def test_the_other_dimensions_and_tensors_are_still_checked_at_the_reply_rank():
    view = truncate(GLOBAL, 4)
    assert "wrong shape" in check({**view, B: np.zeros((7, 4), dtype=np.float32)})
    assert "wrong dtype" in check({**view, A: view[A].astype(np.float64)})
    assert "NaN" in check({**view, HEAD: np.full(3, np.nan, dtype=np.float32)})
    assert "missing" in check({name: value for name, value in view.items() if name != HEAD})


def test_the_update_norm_is_measured_from_what_the_client_held():
    view = truncate(GLOBAL, 4)
    moved = {**view, HEAD: view[HEAD] + np.array([3.0, 4.0, 0.0], dtype=np.float32)}  # norm 5 by hand
    assert check(moved, max_update_norm=5.01) is None
    assert "update norm 5" in check(moved, max_update_norm=4.99)


def test_a_reply_whose_lora_weights_did_not_move_is_refused():
    """Fail closed (Opacus #820): "trained" but the LoRA matrices are exactly as sent."""
    assert "no LoRA weight changed" in check(GLOBAL, trained=False)
    assert "no LoRA weight changed" in check(truncate(GLOBAL, 4), trained=False)
    head_only = {**GLOBAL, HEAD: GLOBAL[HEAD] + 1.0}
    assert "no LoRA weight changed" in check(head_only, trained=False)


def test_the_norm_bound_holds_for_the_update_as_it_is_aggregated_at_the_global_rank():
    """A review: a node of rank ρ whose B moves by u moves the global B by u·R/ρ (lift); the bound was
    checked on u, so a node choosing ρ = 1 got R = 8 times the leverage."""
    view = truncate(GLOBAL, 1)
    moved = {**view, B: view[B] + np.float32(0.1)}  # 6 values: own norm 0.1·√6 = 0.245, aggregated 8 x that
    assert check(moved, sent_rank=1, max_update_norm=1.0, trained=False) is not None
    assert "update norm 1.9" in check(moved, sent_rank=1, max_update_norm=1.0, trained=False)
    assert check(moved, sent_rank=1, max_update_norm=2.0, trained=False) is None
