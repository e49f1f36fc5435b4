"""Server-side evaluation of the global adapter on the held-out split.

Classification: loss and accuracy. Causal LM: the loss per answer token, its perplexity, the
next-token accuracy on answer tokens, and greedy answers to a few fixed held-out prompts, saved
each round as generations/round_NNNN.json in the run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedtune.config import FedtuneConfig
from fedtune.data.chat import tokenize_chats
from fedtune.data.federated import federated_data
from fedtune.data.instruct import federated_instructions
from fedtune.data.text import tokenize
from fedtune.durable import write_json_atomic
from fedtune.models.adapter import load_record
from fedtune.models.build import build_model, load_tokenizer
from fedtune.models.causal import build_causal_model, evaluate_lm, generate_replies
from fedtune.models.evaluate import evaluate

GENERATIONS = "generations"  # the run directory's folder of sample answers, one file per round
SAMPLE_PROMPTS = 3  # held-out prompts answered every round (causal-lm)
SAMPLE_TOKENS = 24  # new tokens per sample answer


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float  # causal-lm: next-token accuracy on answer tokens
    perplexity: float | None = None  # causal-lm only

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl fields; eval_perplexity only where the task has one."""
        extra = {} if self.perplexity is None else {"eval_perplexity": self.perplexity}
        return {"eval_accuracy": self.accuracy, "eval_loss": self.loss, **extra}


class ServerEvaluator:
    """Holds the server's model and tokenized test split; call it with the global arrays."""

    def __init__(self, cfg: FedtuneConfig, generations_dir: Path | None = None) -> None:
        self.causal = cfg.model.task == "causal-lm"
        self.generations_dir = generations_dir
        self.tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.task)
        if self.causal:
            fed = federated_instructions(cfg.data, cfg.clients, cfg.seed)
            test = fed.select(fed.server_test)
            self.model = build_causal_model(cfg.model, cfg.lora, seed=cfg.seed)
            self.test = tokenize_chats(self.tokenizer, test, cfg.model.max_length)
            self.samples = test[:SAMPLE_PROMPTS]
        else:
            data = federated_data(cfg.data, cfg.clients, cfg.seed)
            self.model = build_model(cfg.model, cfg.lora, num_labels=len(data.label_names), seed=cfg.seed)
            self.test = tokenize(self.tokenizer, *data.select(data.server_test), cfg.model.max_length)

    def __call__(self, arrays: ArrayRecord, round_: int | None = None) -> Scores:
        """Scores of the global adapter on the server's test split; with a round number, a causal
        LM's sample answers are saved too."""
        load_record(self.model, arrays)
        if not self.causal:
            return Scores(*evaluate(self.model, self.test))
        loss, accuracy = evaluate_lm(self.model, self.test)
        if self.generations_dir is not None and round_ is not None:
            self.save_generations(round_)
        return Scores(loss, accuracy, math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan"))

    def save_generations(self, round_: int) -> None:
        replies = generate_replies(self.model, self.tokenizer, [c.prompt() for c in self.samples], SAMPLE_TOKENS)
        samples = [{"prompt": c.prompt()[-1]["content"], "reference": c.response, "generated": reply}
                   for c, reply in zip(self.samples, replies, strict=True)]
        write_json_atomic(self.generations_dir / f"round_{round_:04d}.json",
                          {"round": round_, "max_new_tokens": SAMPLE_TOKENS, "samples": samples})
