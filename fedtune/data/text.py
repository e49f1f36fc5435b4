"""Tokenized examples and dynamic padding: each batch is padded only to its longest text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # the label of a token that carries no loss (torch's and transformers' convention)
# No token spans more characters than this: WordPiece turns a longer word into one [UNK], and BPE
# and SentencePiece vocabularies hold far shorter pieces. Cutting a text to max_length x this many
# characters before tokenizing keeps its first max_length tokens and bounds memory whatever its length
# (a 50 MB text once took 4.7 GB in the server and 11 GB in a worker).
CHARS_PER_TOKEN = 100


def token_counts(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Tokens per text (special tokens included), counted on each text cut to what max_length tokens
    can span; a text longer than that counts as at least max_length + 1 (it is truncated)."""
    return _untruncated(tokenizer, texts, max_length)[1]


def _untruncated(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text cut to max_length x CHARS_PER_TOKEN characters, and its token count."""
    limit = max_length * CHARS_PER_TOKEN
    ids = tokenizer([text[:limit] for text in texts], truncation=False, add_special_tokens=True)["input_ids"]
    counts = [len(row) if len(text) <= limit else max(len(row), max_length + 1)
              for row, text in zip(ids, texts, strict=True)]
    return ids, counts


@dataclass(frozen=True)
class TokenizedTexts(Dataset):
    """Token ids (no padding) and integer labels; an item is (input_ids, label)."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.input_ids[index]), torch.tensor(self.labels[index])

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def tokenize(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> TokenizedTexts:
    """Tokenize once; counts texts longer than `max_length` tokens (they are truncated)."""
    if not texts:  # e.g. a client's validation split when data.client_val_fraction is 0
        return TokenizedTexts((), ())
    full, counts = _untruncated(tokenizer, texts, max_length)  # memory bounded by max_length, not the texts
    num_truncated = sum(n > max_length for n in counts)
    if num_truncated:  # the tokenizer's own truncation keeps its special tokens where they belong
        limit = max_length * CHARS_PER_TOKEN
        cut = tokenizer([text[:limit] for text in texts], truncation=True, max_length=max_length)["input_ids"]
    else:
        cut = full
    return TokenizedTexts(tuple(tuple(ids) for ids in cut), tuple(int(y) for y in labels), num_truncated)


PAD_ID = 0  # what pad_batch pads token ids with; the attention mask hides them, whatever the model's pad id


def pad_batch(items: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Collate (input_ids, label) items into a batch padded to its own longest sequence. A label is
    a class id, or (causal LM) one token label per input position, padded with IGNORE_INDEX."""
    longest = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    if items[0][1].dim() == 0:
        labels = torch.stack([label for _, label in items])
    else:
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        for row, (_, label) in enumerate(items):
            labels[row, : len(label)] = label
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
