"""The small-institution DP recipe's parts end to end: mean pooling and one full-batch plain-SGD
step per round under DP-SGD, through Flower's Simulation Engine, and the adapter it exports."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config import load_config
from tests.integration.test_lora_aggregation import rows_of, run

pytestmark = pytest.mark.integration


def test_mean_pooling_sgd_full_batch_under_dp(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.data.demo import LABELS
    from fedtune.models.build import default_model_dir
    from fedtune.models.pooling import use_mean_pooling

    out = run(tmp_path, "--pooling", "mean", "--optimizer", "sgd", "--learning-rate", "2",
              "--batch-size", "4096", "--local-epochs", "1")
    cfg = load_config(out / "config.toml")
    assert cfg.model.pooling == "mean" and cfg.train.optimizer == "sgd"
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["eval_loss"] < rows[0]["eval_loss"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())["clients"]
    entries = [e for es in ledger.values() for e in es]
    assert all(e["status"] == "trained" and 0 < e["epsilon"] < float("inf") for e in entries)
    assert all(e["sample_rate"] == 1.0 and e["steps"] == 1 for e in entries)  # one full-batch step a round
    checkpoint = torch.load(out / "checkpoints" / "round_0002.pt", weights_only=True)["arrays"]
    assert not any("pooler" in n for n in checkpoint)  # mean pooling has nothing to train or send
    # The exported adapter reproduces the run's model once the base pools the same way.
    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=len(LABELS))
    use_mean_pooling(base)
    params = dict(PeftModel.from_pretrained(base, out / "adapter").named_parameters())
    for name, tensor in checkpoint.items():
        torch.testing.assert_close(params[name].detach(), tensor)
