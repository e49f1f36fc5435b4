"""Server-side evaluation of the global adapter on the held-out split."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedtune.config import FedtuneConfig
from fedtune.data.federated import federated_data
from fedtune.data.text import TokenizedTexts, tokenize
from fedtune.models.adapter import load_record
from fedtune.models.build import build_model, load_tokenizer
from fedtune.models.evaluate import evaluate


class ServerEvaluator:
    """Holds the server's model and tokenized test split; call it with the global arrays."""

    def __init__(self, cfg: FedtuneConfig) -> None:
        fed = federated_data(cfg.data, cfg.clients, cfg.seed)
        self.model = build_model(cfg.model, cfg.lora, num_labels=len(fed.label_names), seed=cfg.seed)
        tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.test: TokenizedTexts = tokenize(tokenizer, *fed.select(fed.server_test), cfg.model.max_length)

    def __call__(self, arrays: ArrayRecord) -> tuple[float, float]:
        """(loss, accuracy) of the global adapter on the server's test split."""
        load_record(self.model, arrays)
        return evaluate(self.model, self.test)
