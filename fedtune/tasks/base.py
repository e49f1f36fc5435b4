"""The Task interface: everything about a federation that depends on what is learned.

A task turns a data config into a federation (the server's hold-out and one split per client), an
institution's own file into its (train, validation) records, records into a tokenized Dataset,
and a model config into a PEFT model on its device; it scores a model on a Dataset. The records of
a split are whatever the task's `select` returns; only the task itself looks inside them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from peft import PeftModel
from torch.utils.data import Dataset
from transformers import AutoConfig

from fedtune.config import DataConfig, FedtuneConfig, LoraConfig, ModelConfig
from fedtune.data.canaries import Canaries
from fedtune.data.partition import ClientSplit
from fedtune.errors import ConfigError
from fedtune.models.adapter import restore_initial_state
from fedtune.models.build import load_tokenizer, lora_targets
from fedtune.tasks.registry import TASKS


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float  # causal-lm: next-token accuracy on answer tokens
    perplexity: float | None = None  # tasks that predict tokens only

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl fields; eval_perplexity only where the task has one."""
        extra = {} if self.perplexity is None else {"eval_perplexity": self.perplexity}
        return {"eval_accuracy": self.accuracy, "eval_loss": self.loss, **extra}


class Federation(Protocol):
    """A task's data, split: what every task's federation offers the rest of fedtune."""

    server_test: tuple[int, ...]
    clients: tuple[ClientSplit, ...]
    skipped: tuple[str, ...]
    canaries: Canaries | None
    users: tuple[str, ...]  # data.user_column: whose record each is; empty when not set

    def select(self, indices: Sequence[int]) -> Any: ...


class Task(ABC):
    audit_score: ClassVar[str]  # how `fedtune audit` scores a canary, in words

    # ---- the model -----------------------------------------------------------------------------
    @abstractmethod
    def default_model(self) -> str:
        """The offline base model used when model.name_or_path is empty."""

    def model_path(self, model: ModelConfig) -> str:
        return model.name_or_path or self.default_model()

    def tokenizer(self, model: ModelConfig):
        return load_tokenizer(self.model_path(model))

    def check_model(self, model: ModelConfig, lora: LoraConfig | None = None) -> None:
        """Fail early, with a fix, if the base model cannot be loaded or does not suit the task, or
        (given `lora`) has no module that lora.target_modules names: all before a run directory exists."""
        path = self.model_path(model)
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
            raise ConfigError(f"Invalid option `model.name_or_path`: the directory {path} does not exist. Give a "
                              "local directory with config.json and weights, or leave it empty for the task's "
                              "built-in offline model.")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"Cannot load the base model `{path}` (model.name_or_path): {err}. Give a local directory "
                "with config.json and weights, or a Hugging Face hub id while online; leave it empty for "
                "the task's built-in offline model.") from err
        if Path(path).expanduser().is_dir():
            check_weights(Path(path).expanduser())
        self.check_architecture(path, config, model)
        check_tokenizer(path, config)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and model.max_length > limit:
            raise ConfigError(f"Invalid option `model.max_length`: {model.max_length} tokens, but the base model "
                              f"`{path}` reads at most {limit} (its max_position_embeddings). Use at most {limit}.")
        if lora is not None:
            lora_targets(self.meta_model(config), lora)

    @abstractmethod
    def auto_class(self) -> type:
        """The transformers Auto class this task's base model is built with."""

    def meta_model(self, config) -> torch.nn.Module:
        """The task's model of `config` on the meta device: its architecture, no weights read or allocated."""
        with torch.device("meta"):
            return self.auto_class().from_config(config)

    def check_architecture(self, path: str, config, model: ModelConfig) -> None:
        """Task-specific checks of a loadable model (its class, its tokenizer); none by default."""
        return None

    def check_config(self, cfg: FedtuneConfig) -> None:
        """Refuse options this task does not support (each field is already valid on its own); none by default."""
        return None

    def private_recipe(self, cfg: FedtuneConfig, facts, pinned: frozenset[str]) -> dict[str, tuple[Any, str]]:
        """What this task trains by under DP-SGD (fedtune/recipe.py): dotted key -> (value, why), for
        a config whose target ε is set; the keys in `pinned` were given by hand and are kept whatever this
        returns. None by default: the options' own defaults."""
        return {}

    def private_advice(self, cfg: FedtuneConfig, facts, pinned: frozenset[str]) -> tuple[str, ...]:
        """What a user should know about the noise this task will train under (recipe.py::noise_advice),
        for the same arguments as private_recipe. Nothing by default."""
        return ()

    def plain_recipe(self, cfg: FedtuneConfig, facts) -> dict[str, tuple[Any, str]]:
        """What this task trains by without DP (fedtune/recipe.py), in the same form as private_recipe.
        None by default: the options' own defaults."""
        return {}

    @abstractmethod
    def build_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        """Base model + LoRA on model.device; one cached instance per process and config."""

    def initial_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        """A run's round-0 model: the cached instance, with the trainable weights it was built with."""
        built = self.build_model(model, lora, data, seed)
        restore_initial_state(built)
        return built

    @abstractmethod
    def fresh_model(self, model: ModelConfig, lora: LoraConfig, data: DataConfig, seed: int) -> PeftModel:
        """An uncached instance, for callers that change the model itself (merging, export)."""

    # ---- the data ------------------------------------------------------------------------------
    @abstractmethod
    def resolve_data(self, data: DataConfig) -> DataConfig:
        """The data config to save with a new run: an absolute data.path and whatever every client
        must share (a classifier's label list)."""

    @abstractmethod
    def federation(self, data: DataConfig, num_clients: int, seed: int) -> Federation:
        """The server hold-out and per-client splits, deterministic in (data, num_clients, seed)."""

    @abstractmethod
    def own_records(self, data: DataConfig, secret: str) -> tuple[Any, Any, tuple[str, ...]]:
        """Deployment: (train, validation) records of an institution's own file at data.path, split by its
        `secret` (client/data.py::split_secret), and the user of each training record (data.user_column;
        empty when not set)."""

    @abstractmethod
    def tokenize(self, tokenizer, records: Any, max_length: int) -> Dataset:
        """Records (as `select` returns them) as a Dataset that train and evaluate accept."""

    @abstractmethod
    def canary_records(self, canaries: Canaries) -> Any:
        """The audit's canaries as records that `tokenize` accepts."""

    @abstractmethod
    def summary(self, fed: Federation, data: DataConfig, tokenizer, max_length: int) -> dict[str, Any]:
        """The partition summary (data/summary.py) of `fed`."""

    # ---- scoring -------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: torch.nn.Module, dataset: Dataset) -> Scores: ...

    @abstractmethod
    def example_losses(self, model: torch.nn.Module, dataset: Dataset) -> list[float]:
        """Each record's own loss, in order (the audit's canary scores)."""

    def sample_answers(self, model: torch.nn.Module, tokenizer, records: Any) -> list[dict[str, str]]:
        """A few held-out records answered by the model, saved each round; none by default."""
        return []


def get_task(name: str) -> Task:
    """The task called `name` (one of registry.TASKS; the config has checked it), imported on first use."""
    return importlib.import_module(TASKS[name]).TASK


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")
LFS_POINTER = b"version https://git-lfs"


def check_weights(directory: Path) -> None:
    """Refuse a local model directory without readable weights: none at all, or git-lfs pointers in their
    place (a `git clone` without git-lfs), which transformers would only fail on after the run began."""
    files = sorted(f for pattern in WEIGHT_FILES for f in directory.glob(pattern))
    if not files:
        raise ConfigError(f"Invalid option `model.name_or_path`: {directory} has config.json but no weights "
                          "(model.safetensors, pytorch_model.bin or a .gguf file). Copy the model's weight files "
                          "into it, or leave model.name_or_path empty for the task's built-in offline model.")
    for file in files:
        with file.open("rb") as handle:
            head = handle.read(len(LFS_POINTER))
        # safetensors: 8 bytes of header length, then that many bytes of JSON
        length = int.from_bytes(head[:8], "little")
        readable = not head.startswith(LFS_POINTER) and (
            file.suffix != ".safetensors" or (0 < length <= file.stat().st_size - 8 and head[8:9] == b"{"))
        if not readable:
            raise ConfigError(f"Invalid option `model.name_or_path`: {file} is not a weights file (a git-lfs pointer "
                              "or a damaged download). Run `git lfs pull` in that directory, or copy the weights "
                              "again.")


def check_tokenizer(path: str, config) -> None:
    """Refuse a model whose tokenizer files are missing: transformers then builds a tokenizer of a few
    special tokens, and every word of the data becomes [UNK] without a word."""
    vocab = getattr(config, "vocab_size", None)
    try:
        tokens = len(load_tokenizer(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"Invalid option `model.name_or_path`: the tokenizer of `{path}` cannot be loaded ({err}). "
                          "Copy its tokenizer files (tokenizer.json, vocab.txt or the like) into the model's "
                          "directory.") from None
    if isinstance(vocab, int) and tokens < vocab / 2:
        raise ConfigError(f"Invalid option `model.name_or_path`: the tokenizer of `{path}` has {tokens} tokens, "
                          f"but the model {vocab}: its tokenizer files (tokenizer.json, vocab.txt or the like) are "
                          "missing. Copy them into the model's directory.")
