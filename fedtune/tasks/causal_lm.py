"""Causal LM: instruction tuning on (instruction, input, response) records or chats, with the loss
on the assistant's answers only (data/instruct.py, data/chat.py, models/causal.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import PeftModel

from fedtune.config import DataConfig, FedtuneConfig, LoraConfig, ModelConfig
from fedtune.data.canaries import Canaries
from fedtune.data.chat import TokenizedChats, chat_summary, tokenize_chats
from fedtune.data.instruct import (
    Conversation,
    InstructData,
    federated_instructions,
    local_instructions,
    resolve_instructions,
)
from fedtune.errors import ConfigError
from fedtune.models.build import load_tokenizer
from fedtune.models.causal import (
    build_causal_model,
    evaluate_lm,
    example_lm_losses,
    fresh_causal_model,
    generate_replies,
)
from fedtune.models.default_lm import default_lm_dir
from fedtune.tasks.base import Scores, Task

SAMPLE_PROMPTS = 3  # held-out prompts answered every round
SAMPLE_TOKENS = 24  # new tokens per sample answer


class CausalLM(Task):
    audit_score = "minus the canary's mean cross-entropy over its answer tokens under the final global adapter"

    def default_model(self) -> str:
        return str(default_lm_dir())  # converted from GGUF on first use

    def auto_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def check_architecture(self, path: str, config, model: ModelConfig) -> None:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ConfigError(f"The base model `{path}` ({config.model_type}) is not a causal language model, which "
                              "task causal-lm needs. Name one in model.name_or_path, or leave it empty for SmolLM2.")
        if getattr(load_tokenizer(path), "chat_template", None) is None:
            raise ConfigError(f"The tokenizer of `{path}` has no chat template, which task causal-lm formats "
                              "instructions with. Use an instruction-tuned (chat) model.")

    def check_config(self, cfg: FedtuneConfig) -> None:
        if cfg.model.pooling != "cls":
            raise ConfigError(f"Invalid option `model.pooling`: `{cfg.model.pooling}` applies to classification "
                              "only; leave it `cls` for causal-lm.")
        if cfg.model.head_init != "random":
            raise ConfigError(f"Invalid option `model.head_init`: `{cfg.model.head_init}` applies to classification "
                              "only; a causal LM has no classification head. Leave it `random`.")

    def build_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        return build_causal_model(model, lora, seed=seed)

    def fresh_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        return fresh_causal_model(model, lora, seed=seed)

    def resolve_data(self, data: DataConfig) -> DataConfig:
        return resolve_instructions(data)

    def federation(self, data: DataConfig, num_clients: int, seed: int) -> InstructData:
        return federated_instructions(data, num_clients, seed)

    def own_records(self, data: DataConfig, secret: str) -> tuple[list[Conversation], list[Conversation],
                                                                tuple[str, ...]]:
        return local_instructions(data, secret)

    def tokenize(self, tokenizer, records: list[Conversation], max_length: int) -> TokenizedChats:
        return tokenize_chats(tokenizer, records, max_length)

    def canary_records(self, canaries: Canaries) -> list[Conversation]:
        return list(canaries.records)

    def summary(self, fed: InstructData, data: DataConfig, tokenizer, max_length: int) -> dict[str, Any]:
        return chat_summary(fed, data, tokenizer, max_length)

    def evaluate(self, model: torch.nn.Module, dataset: TokenizedChats) -> Scores:
        loss, accuracy = evaluate_lm(model, dataset)
        return Scores(loss, accuracy, math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan"))

    def example_losses(self, model: torch.nn.Module, dataset: TokenizedChats) -> list[float]:
        return example_lm_losses(model, dataset)

    def sample_answers(self, model: torch.nn.Module, tokenizer, records: list[Conversation]) -> list[dict[str, str]]:
        samples = records[:SAMPLE_PROMPTS]
        replies = generate_replies(model, tokenizer, [chat.prompt() for chat in samples], SAMPLE_TOKENS)
        return [{"prompt": chat.prompt()[-1]["content"], "reference": chat.response, "generated": reply}
                for chat, reply in zip(samples, replies, strict=True)]


TASK = CausalLM()
