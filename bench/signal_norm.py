"""How long is the signal in a private recipe's round? (issue #19; not a test)

The private recipe's learning-rate rule (fedtune/recipe.py::recipe_learning_rate) first holds a
round's step length lr·C·√(s² + r²) where the tuned runs had it, taking s, the norm of the mean
clipped per-record gradient in units of C, to be 1; its labels factor then reads s as about
0.36 / √labels, from what this script measured. This measures s on each data set's training split at
round 0: the recipe's trained values (LoRA r = 2 on the last layer's query and value, and the head,
started from the label names where the labels are words), every record's gradient clipped to C = 1
(bench/dp_emulator.py's Tail and clipped_sum), dropout on as in training, and the norm of their
mean. It reads training records, so it is a development measurement, never something a run may
compute.

    python bench/signal_norm.py [--datasets phrasebank medical banking77] [--max-length 64]

Prints one line per data set, and as its last line the results as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from opacus.grad_sample import GradSampleModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_emulator import LAST, Tail, clipped_sum, load  # noqa: E402

from fedtune.config import LoraConfig, ModelConfig  # noqa: E402
from fedtune.models.build import build_model, load_tokenizer  # noqa: E402
from fedtune.models.head_init import init_head_from_label_names, names_are_words  # noqa: E402


def signal_norm(name: str, max_length: int) -> dict:
    """s for one data set, and the head's share of it."""
    data = load(name, "validation", max_length)
    labels = list(data["labels"])
    lora = LoraConfig(r=2, alpha=4.0, modules_to_save=(),
                      target_modules=(f"layer.{LAST}.attention.self.query", f"layer.{LAST}.attention.self.value"))
    # uncached (build_model keeps its models): the head set below must not reach a later data set
    model = build_model.__wrapped__(ModelConfig(pooling="mean"), lora, len(labels), 0)
    if names_are_words(labels):
        init_head_from_label_names(model, labels, load_tokenizer(""), max_length)
    tail = GradSampleModule(Tail(model))
    params = [p for p in tail.parameters() if p.requires_grad]
    torch.manual_seed(0)  # clipped_sum trains with dropout on, as a client does
    total = clipped_sum(tail, params, data["train_h"], data["train_m"], data["train_y"], 1.0)
    tail._close()
    n = len(data["train_y"])
    norm = sum(float(t.pow(2).sum()) for t in total) ** 0.5 / n
    head = sum(float(t.pow(2).sum()) for t in total[-2:]) ** 0.5 / n  # the classifier's weight and bias
    return {"dataset": name, "labels": len(labels), "records": n, "trained_values": sum(p.numel() for p in params),
            "label_names_head": names_are_words(labels), "signal": round(norm, 4), "head_signal": round(head, 4),
            "one_over_sqrt_labels": round(len(labels) ** -0.5, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["phrasebank", "medical", "banking77"])
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per text [default: 64].")
    args = parser.parse_args()
    results = []
    for name in args.datasets:
        start = time.time()
        results.append(signal_norm(name, args.max_length))
        print(f"{name}: {results[-1]} ({time.time() - start:.0f} s)", flush=True)
    print(json.dumps({"benchmark": "signal_norm", "max_length": args.max_length, "results": results}))


if __name__ == "__main__":
    main()
