"""train.lr_schedule: the server decays the client learning rate over the rounds, and a client
trains at the rate the server sent for the round."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune import constants as k
from fedtune.client.app import train
from fedtune.config import FedtuneConfig, TrainConfig
from fedtune.data.demo import LABELS
from fedtune.errors import ConfigError
from fedtune.models.adapter import to_record
from fedtune.models.build import build_model


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_the_rate_starts_at_the_configured_one_and_decays_but_never_to_zero(schedule, expected):
    train_cfg = TrainConfig(learning_rate=0.004, lr_schedule=schedule)
    rates = [train_cfg.learning_rate_at(r, 4) for r in range(1, 5)]
    assert rates == pytest.approx([0.004 * e for e in expected])
    assert rates[-1] > 0


def test_an_unknown_schedule_names_the_option():
    with pytest.raises(ConfigError, match="`train.lr_schedule`.*linear"):
        FedtuneConfig.from_flat({"train.lr_schedule": "step"})


def _adapter_change(cfg: FedtuneConfig, tmp_path, config: dict) -> float:
    """Norm of the change one client's round makes to the adapter it was sent."""
    model = build_model(cfg.model, cfg.lora, num_labels=len(LABELS), seed=cfg.seed)
    sent = to_record(model)
    content = RecordDict({k.ARRAYS: sent, k.CONFIG: ConfigRecord({
        **cfg.to_flat(), k.SERVER_ROUND: 1, k.CLIENT_STATE_DIR: str(tmp_path), **config})})
    context = Context(run_id=1, node_id=7, node_config={k.PARTITION_ID: 0, k.NUM_PARTITIONS: cfg.clients},
                      state=RecordDict(), run_config={})
    reply = train(Message(content, dst_node_id=7, message_type="train"), context)
    before, after = sent.to_torch_state_dict(), reply.content[k.ARRAYS].to_torch_state_dict()
    return math.sqrt(sum(float((after[name] - before[name]).pow(2).sum()) for name in before))


@pytest.mark.usefixtures("flower_run")
def test_the_client_trains_at_the_rate_the_server_sent_for_the_round(tmp_path):
    cfg = FedtuneConfig.from_flat({"clients": 2, "dp.enabled": False, "data.demo_examples": 80,
                                   "train.batch_size": 8, "train.learning_rate": 3e-3, "lora.r": 2})
    torch.manual_seed(0)
    at_run_rate = _adapter_change(cfg, tmp_path / "a", {})
    at_sent_rate = _adapter_change(cfg, tmp_path / "b", {k.LEARNING_RATE: 3e-8})
    assert at_run_rate > 0
    # AdamW moves each coordinate by about lr per step, so the change scales with the rate sent.
    assert at_sent_rate < 1e-3 * at_run_rate
