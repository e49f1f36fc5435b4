"""Loss and accuracy of a classifier on tokenized examples (server and clients share it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedtune.data.text import TokenizedTexts, pad_batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenizedTexts, batch_size: int = 64) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over `data`."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=pad_batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        total_loss += out.loss.item() * len(batch["labels"])
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    return total_loss / len(data), correct / len(data)


@torch.no_grad()
def example_losses(model: torch.nn.Module, data: TokenizedTexts, batch_size: int = 64) -> list[float]:
    """Each example's own cross-entropy loss, in order (the privacy audit's canary scores)."""
    model.eval()
    device = next(model.parameters()).device
    losses: list[float] = []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=pad_batch):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        losses += F.cross_entropy(logits.float(), batch["labels"].to(device), reduction="none").tolist()
    return losses
