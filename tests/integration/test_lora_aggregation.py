"""LoRA-aware aggregation end to end: `exact` with mixed client ranks, and `ffa` under DP-SGD,
each a tiny federation through Flower's Simulation Engine, on the tiny classifier (they check what is
aggregated, sent and exported, not how well it learns)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.test_simulate import TINY, fedtune

pytestmark = pytest.mark.integration


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path: Path, *args: str) -> Path:
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "tiny.toml"), "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def peft_adapter(out: Path, base_model: Path):
    """The run's adapter/ loaded by PEFT onto a fresh base model, and the last checkpoint's arrays."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.data.demo import LABELS

    base = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=len(LABELS))
    model = PeftModel.from_pretrained(base, out / "adapter")
    checkpoint = torch.load(out / "checkpoints" / "round_0002.pt", weights_only=True)
    return dict(model.named_parameters()), checkpoint["arrays"]


def test_exact_aggregation_with_client_ranks_2_and_4(tmp_path, tiny_classifier):
    from transformers import AutoConfig

    out = run(tmp_path, "--no-dp", "--lora-aggregation", "exact", "--client-ranks", "2,4",
              "--model", str(tiny_classifier))
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["num_clients"] == 3
    assert rows[2]["eval_accuracy"] >= rows[0]["eval_accuracy"]
    # Round 1 sends everyone rank 4; by round 2 the server knows clients 0 and 2 train rank 2 and
    # sends them the smaller view.
    assert rows[2]["bytes_down"] < rows[1]["bytes_down"]
    params, arrays = peft_adapter(out, tiny_classifier)
    base = AutoConfig.from_pretrained(tiny_classifier)
    a_names = [n for n in arrays if "lora_A" in n]
    assert len(a_names) == 2 * base.num_hidden_layers  # query and value in every layer
    for name, tensor in arrays.items():  # the adapter PEFT loads is the global rank-4 checkpoint
        torch.testing.assert_close(params[name].detach(), tensor)
    for name in a_names:  # the SVD factors: A with orthonormal rows
        a = arrays[name].double().numpy()
        assert a.shape == (4, base.hidden_size)
        np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-5)


def test_ffa_under_dp_sgd_trains_b_only(tmp_path, tiny_classifier):
    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.data.demo import LABELS
    from fedtune.models.build import build_model

    out = run(tmp_path, "--lora-aggregation", "ffa", "--model", str(tiny_classifier))
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2]  # a tiny random model: what it learns is not the point
    ledger = json.loads((out / "privacy_ledger.json").read_text())["clients"]
    assert all(0 < e["epsilon"] < float("inf") and e["status"] == "trained" for es in ledger.values() for e in es)
    params, arrays = peft_adapter(out, tiny_classifier)
    assert not any("lora_A" in n for n in arrays)  # A never travels nor enters a checkpoint
    shared = build_model.__wrapped__(ModelConfig(name_or_path=str(tiny_classifier)), LoraConfig(r=4, aggregation="ffa"),
                                     num_labels=len(LABELS))
    initial = dict(shared.named_parameters())
    for name, param in params.items():
        if "lora_A" in name:  # the exported A is the seed's shared one
            torch.testing.assert_close(param.detach(), initial[name].detach(), rtol=0, atol=0)
        elif name in arrays:
            torch.testing.assert_close(param.detach(), arrays[name])
    assert any(float(t.abs().max()) > 0 for n, t in arrays.items() if "lora_B" in n)  # B trained from zero
