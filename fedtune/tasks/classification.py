"""Classification: label each text (data.text_column -> data.label_column) with one of the run's
labels, through a classification head on the base model's pooled states."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from fedtune.config import DataConfig, LoraConfig, ModelConfig
from fedtune.data.canaries import Canaries
from fedtune.data.federated import FederatedData, Texts, federated_data, label_names, local_data, resolve_data
from fedtune.data.summary import partition_summary
from fedtune.data.text import TokenizedTexts, token_counts, tokenize
from fedtune.models.build import build_model, default_model_dir
from fedtune.models.evaluate import evaluate, example_losses
from fedtune.models.pooling import use_mean_pooling
from fedtune.tasks.base import Scores, Task


class Classification(Task):
    audit_score = "minus the canary's cross-entropy loss under the final global adapter"

    def default_model(self) -> str:
        return str(default_model_dir())

    def check_architecture(self, path: str, config, model: ModelConfig) -> None:
        if model.pooling == "mean":
            from transformers import AutoModelForSequenceClassification

            with torch.device("meta"):  # the architecture only: no weights are read or allocated
                use_mean_pooling(AutoModelForSequenceClassification.from_config(config))

    def build_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        return build_model(model, lora, num_labels=len(label_names(data)), seed=seed)

    def fresh_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        labels = label_names(data)
        fresh = build_model.__wrapped__(model, lora, num_labels=len(labels), seed=seed)
        fresh.config.id2label = dict(enumerate(labels))  # an exported model names its labels
        fresh.config.label2id = {name: i for i, name in enumerate(labels)}
        return fresh

    def resolve_data(self, data: DataConfig) -> DataConfig:
        return resolve_data(data)

    def federation(self, data: DataConfig, num_clients: int, seed: int) -> FederatedData:
        return federated_data(data, num_clients, seed)

    def own_records(self, data: DataConfig, seed: int) -> tuple[Texts, Texts]:
        return local_data(data, seed)

    def tokenize(self, tokenizer, records: Texts, max_length: int) -> TokenizedTexts:
        texts, labels = records
        return tokenize(tokenizer, texts, labels, max_length)

    def canary_records(self, canaries: Canaries) -> Texts:
        texts, labels = zip(*canaries.records, strict=True)
        return list(texts), list(labels)

    def summary(self, fed: FederatedData, data: DataConfig, tokenizer, max_length: int) -> dict[str, Any]:
        return partition_summary(fed, data, token_counts(tokenizer, fed.texts, max_length), max_length)

    def evaluate(self, model: torch.nn.Module, dataset: TokenizedTexts) -> Scores:
        return Scores(*evaluate(model, dataset))

    def example_losses(self, model: torch.nn.Module, dataset: TokenizedTexts) -> list[float]:
        return example_losses(model, dataset)


TASK = Classification()
