"""The causal-LM task: base model + LoRA, its loss, held-out loss and perplexity, sample generations.

Like models/build.py, the model is built once per process and config, and a client call only
swaps the trainable LoRA weights in. Nothing else trains: the input and output embeddings are
tied in small LMs such as SmolLM2, so training either would train both, and the pair is by far
the largest matrix of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForCausalLM

from fedtune.config import LoraConfig, ModelConfig
from fedtune.data.text import IGNORE_INDEX, pad_batch
from fedtune.errors import ConfigError
from fedtune.models.adapter import remember_initial_state
from fedtune.models.build import lora_targets
from fedtune.models.default_lm import default_lm_dir
from fedtune.models.lora_factors import freeze_shared_a

Chat = Sequence[dict[str, str]]


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      **_: object) -> torch.Tensor:
    """Each sequence's mean cross-entropy over its labelled tokens, averaged over the sequences.

    Replaces transformers' default, which averages over all labelled tokens of the batch: there a
    sequence's loss (and so its gradient) depends on how many tokens the *other* sequences have,
    which breaks the per-example sensitivity DP-SGD assumes. Here example i's term depends on
    example i only, and the batch mean is what Opacus' loss_reduction="mean" expects.
    """
    return sequence_losses(logits, labels, ignore_index).mean()


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy over its labelled tokens (0 for a sequence with none):
    per_sequence_loss before its mean, and the per-sample losses Opacus' ghost clipping takes."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                 ignore_index=ignore_index, reduction="none").view(target.shape)
    counts = (target != ignore_index).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def build_causal_model(model: ModelConfig, lora: LoraConfig, seed: int = 0) -> PeftModel:
    """Base model + LoRA, on its device. Cached: one instance per process and config."""
    return _cached(model, lora, seed)


def fresh_causal_model(model: ModelConfig, lora: LoraConfig, seed: int = 0) -> PeftModel:
    """An uncached instance, for callers that change the model itself (merging, export)."""
    torch.manual_seed(seed)  # same LoRA init in every process
    # Opacus' per-sample gradients need the attention computed by plain modules (eager), not a fused kernel.
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path or str(default_lm_dir()),
                                                attn_implementation="eager", dtype=torch.float32)
    base.loss_function = per_sequence_loss
    # Opacus issue #820: move to the device *before* wrapping with peft, or the LoRA
    # parameters that Opacus hooks are not the ones that train.
    base.to(model.device)
    peft_config = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(base, lora), modules_to_save=_full_modules(base, lora) or None,
    )
    peft_model = get_peft_model(base, peft_config)
    if lora.aggregation == "ffa":
        freeze_shared_a(peft_model, seed)  # A shared through the seed, never sent (models/lora_factors.py)
    remember_initial_state(peft_model)
    return peft_model


_cached = lru_cache(maxsize=4)(fresh_causal_model)  # several ranks per worker: see models/build.py


def _full_modules(base: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """lora.modules_to_save present in `base`; the (tied) embeddings are refused."""
    present = {name.rsplit(".", 1)[-1]: module for name, module in base.named_modules()}
    chosen = [name for name in lora.modules_to_save if name in present]
    embeddings = {id(base.get_input_embeddings()), id(base.get_output_embeddings())}
    tied = [name for name in chosen if id(present[name]) in embeddings]
    if tied:
        raise ConfigError(f"Invalid option `lora.modules_to_save`: {', '.join(tied)} holds the model's input or "
                          "output embeddings, which stay frozen (they are tied and are most of the model). "
                          "Leave them out.")
    return chosen


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: Dataset, batch_size: int = 8) -> tuple[float, float]:
    """(mean cross-entropy per labelled token, next-token accuracy on them) over `data`.
    Token-weighted, so exp(loss) is the perplexity of the responses."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, tokens = 0.0, 0, 0
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=pad_batch):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(device)
        scored = target != IGNORE_INDEX
        total_loss += F.cross_entropy(logits[scored], target[scored], reduction="sum").item()
        correct += (logits[scored].argmax(-1) == target[scored]).sum().item()
        tokens += int(scored.sum())
    if tokens == 0:
        return float("nan"), float("nan")
    return total_loss / tokens, correct / tokens


@torch.no_grad()
def generate_replies(model: torch.nn.Module, tokenizer, prompts: Sequence[Chat], max_new_tokens: int = 24) -> list[str]:
    """Greedy continuations of each prompt (a chat without its final answer), one at a time (no padding)."""
    model.eval()
    device = next(model.parameters()).device
    replies = []
    for messages in prompts:
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True).to(device)
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


@torch.no_grad()
def example_lm_losses(model: torch.nn.Module, data: Dataset, batch_size: int = 8) -> list[float]:
    """Each conversation's own loss, in order: its mean cross-entropy over its answer tokens, as in
    training (per_sequence_loss); NaN for one with no answer token left after truncation."""
    model.eval()
    device = next(model.parameters()).device
    losses: list[float] = []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=pad_batch):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(device)
        token_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (target != IGNORE_INDEX).sum(dim=1)
        losses += (token_loss.sum(dim=1) / counts).tolist()  # 0/0 is NaN: nothing to score
    return losses
