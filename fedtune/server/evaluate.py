"""Server-side evaluation of the global adapter on the held-out split.

The task scores it (tasks/): loss and accuracy, and for a causal LM also perplexity and greedy
answers to a few fixed held-out prompts, saved each round as generations/round_NNNN.json in the
run directory.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord

from fedtune.config import FedtuneConfig
from fedtune.durable import write_json_atomic
from fedtune.models.adapter import load_record
from fedtune.tasks.base import Scores, get_task

GENERATIONS = "generations"  # the run directory's folder of sample answers, one file per round


class ServerEvaluator:
    """Holds the server's model and tokenized test split; call it with the global arrays."""

    def __init__(self, cfg: FedtuneConfig, generations_dir: Path | None = None) -> None:
        self.task = get_task(cfg.model.task)
        self.generations_dir = generations_dir
        self.tokenizer = self.task.tokenizer(cfg.model)
        fed = self.task.federation(cfg.data, cfg.clients, cfg.seed)
        self.test_records = fed.select(fed.server_test)
        self.model = self.task.initial_model(cfg.model, cfg.lora, cfg.data, cfg.seed)  # round 0's, as sent
        self.test = self.task.tokenize(self.tokenizer, self.test_records, cfg.model.max_length)

    def __call__(self, arrays: ArrayRecord, round_: int | None = None) -> Scores:
        """Scores of the global adapter on the server's test split; with a round number, the task's
        sample answers (if it has any) are saved too."""
        load_record(self.model, arrays)
        scores = self.task.evaluate(self.model, self.test)
        if self.generations_dir is not None and round_ is not None:
            self.save_generations(round_)
        return scores

    def save_generations(self, round_: int) -> None:
        samples = self.task.sample_answers(self.model, self.tokenizer, self.test_records)
        if samples:
            write_json_atomic(self.generations_dir / f"round_{round_:04d}.json", {"round": round_, "samples": samples})
