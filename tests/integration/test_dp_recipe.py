"""The private recipe end to end: a DP run given only its size gets mean pooling, LoRA in the last
layer and one full-batch plain-SGD step per round at a target ε of 8, through Flower's Simulation
Engine, with the reasons in config.toml, and the adapter it exports loads with PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config import load_config
from tests.integration.test_lora_aggregation import rows_of
from tests.integration.test_simulate import fedtune

pytestmark = pytest.mark.integration


ONLY_ITS_SIZE = """
rounds = 2
clients = 3
[data]
demo_examples = 360
test_fraction = 0.25
"""


def test_a_dp_run_given_only_its_size_trains_by_the_private_recipe(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.data.demo import LABELS
    from fedtune.models.build import default_model_dir
    from fedtune.models.pooling import use_mean_pooling

    (tmp_path / "size.toml").write_text(ONLY_ITS_SIZE)
    out = tmp_path / "run"
    result = fedtune("simulate", "--config", str(tmp_path / "size.toml"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Private recipe" in result.stdout + result.stderr
    # the chosen layers are printed as a list, not swallowed as console markup
    assert "lora.target_modules = [layer.5.attention.self.query, layer.5.attention.self.value]" in " ".join(
        result.stderr.split())
    cfg = load_config(out / "config.toml")
    assert cfg.model.pooling == "mean" and cfg.train.optimizer == "sgd" and cfg.rounds == 2  # rounds: given
    assert cfg.dp.target_epsilon == 8.0 and cfg.train.lr_schedule == "cosine"
    chosen = {note.split(" = ", 1)[0] for note in cfg.recipe.chosen}
    assert {"dp.target_epsilon", "train.learning_rate", "lora.target_modules"} <= chosen and "rounds" not in chosen
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["eval_loss"] < rows[0]["eval_loss"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())["clients"]
    entries = [e for es in ledger.values() for e in es]
    assert all(e["status"] == "trained" and 0 < e["epsilon"] <= 8.0 * 1.001 for e in entries)
    assert max(e["epsilon"] for e in entries) == pytest.approx(8.0, rel=0.01)  # the target, spent over the run
    assert all(e["sample_rate"] == 1.0 and e["steps"] == 1 for e in entries)  # one full-batch step a round
    checkpoint = torch.load(out / "checkpoints" / "round_0002.pt", weights_only=True)["arrays"]
    assert not any("pooler" in n for n in checkpoint)  # mean pooling has nothing to train or send
    assert all("layer.5." in n or "classifier" in n for n in checkpoint)  # LoRA in the last layer only
    # The exported adapter reproduces the run's model once the base pools the same way.
    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=len(LABELS))
    use_mean_pooling(base)
    params = dict(PeftModel.from_pretrained(base, out / "adapter").named_parameters())
    for name, tensor in checkpoint.items():
        torch.testing.assert_close(params[name].detach(), tensor)


def test_sampled_rounds_without_shared_noise_account_each_institution_s_own_sample(tmp_path):
    """The recipe's sampled rounds where each institution adds its own noise: a round is one Poisson step
    at q at each, the ledger holds q and one step, the target ε is spent over the rounds, privacy-verify
    recomputes it, and the report states the secret-sample assumption."""
    out = tmp_path / "run"
    result = fedtune("simulate", "--clients", "3", "--rounds", "2", "--examples", "300", "--sample-rate", "0.5",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(out)
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"], "the server applies the average of the sampled steps"
    entries = [e for es in json.loads((out / "privacy_ledger.json").read_text())["clients"].values() for e in es]
    assert len(entries) == 6 and all((e["sample_rate"], e["steps"]) == (0.5, 1) for e in entries)
    assert not any(e.get("distributed_min_honest") for e in entries), "each adds all of its own noise"
    assert max(e["epsilon"] for e in entries) == pytest.approx(8.0, rel=0.01)
    assert fedtune("privacy-verify", str(out)).returncode == 0
    assert fedtune("privacy-report", str(out)).returncode == 0
    assert "**Secret samples** (q = 0.5)" in (out / "privacy_report.md").read_text()
