"""A tiny federated instruction-tuning run of SmolLM2-135M through Flower's Simulation Engine, driven by
the `fedtune` command, and its export. Kept small for CPU: 2 clients, 1 round, 40 short records."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tests.integration.test_simulate import fedtune, fedtune_here

pytestmark = pytest.mark.integration

TINY = """
rounds = 1
clients = 2
[model]
task = "causal-lm"
max_length = 48
[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
[train]
batch_size = 8
learning_rate = 0.005
local_epochs = 2
[dp]
enabled = false
[data]
test_fraction = 0.2
partition = "iid"
"""

ADVICE = {"mild": "Self-care: rest at home.", "bad": "Urgent: see a doctor today.",
          "severe": "Emergency: call an ambulance."}
SYMPTOMS = {"mild": ("a sore throat", "a runny nose", "a small bruise", "a dry cough"),
            "bad": ("a high fever", "a deep cut", "ear pain", "a sprained ankle"),
            "severe": ("chest pain", "a seizure", "heavy bleeding", "no breathing")}


def instructions(n: int) -> list[dict]:
    """Short triage records in both formats: (instruction, response) and chat messages."""
    rng, rows = random.Random(0), []
    for i in range(n):
        level = ("mild", "bad", "severe")[i % 3]
        symptom = rng.choice(SYMPTOMS[level])
        if i % 2:
            rows.append({"system": "Be brief.", "instruction": f"Triage: {symptom}.", "response": ADVICE[level]})
        else:
            rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"Patient has {symptom}."},
                                      {"role": "assistant", "content": ADVICE[level]}]})
    return rows


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("lm")
    (base / "tiny.toml").write_text(TINY)
    (base / "triage.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instructions(40)))
    out = base / "run"
    result = fedtune("simulate", "--config", str(base / "tiny.toml"), "--data", str(base / "triage.jsonl"),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_held_out_loss_and_perplexity_drop(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    for row in rows:
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["final_eval_perplexity"] < summary["initial_eval_perplexity"]
    assert 0 < rows[1]["bytes_up"] < 0.005 * summary["base_model_bytes"]  # only LoRA travels


def test_sample_generations_are_saved_every_round(finished_run):
    rounds = [json.loads((finished_run / "generations" / f"round_{r:04d}.json").read_text()) for r in (0, 1)]
    prompts = [[s["prompt"] for s in g["samples"]] for g in rounds]
    assert prompts[0] == prompts[1] and len(prompts[0]) == 3  # the same held-out prompts each round
    assert all(s["generated"].strip() and s["reference"] in ADVICE.values() for g in rounds for s in g["samples"])


def test_merged_export_loads_with_transformers_and_generates(finished_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.models.default_lm import default_lm_dir

    code, stdout, stderr = fedtune_here("export", str(finished_run), "--merged", str(tmp_path / "merged"),
                                        "--adapter", str(tmp_path / "adapter"))
    assert code == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Triage: chest pain."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1] and tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    # The merged weights are the base plus the run's adapter: the same outputs as base + PEFT adapter.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_lm_dir()), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(**prompt).logits, adapted(**prompt).logits, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(default_lm_dir())
        assert not torch.allclose(base(**prompt).logits, merged(**prompt).logits, atol=1e-3)
