"""Conversations as token ids with the tokenizer's chat template, and labels that put the loss on the
assistant's answers only: every prompt token (system, user, the template's markup) and every
padding position is labelled IGNORE_INDEX.

Where an answer starts and ends comes from the template itself: the conversation up to an answer,
rendered with the generation prompt, must be a prefix of the whole rendered conversation (true of
the usual ChatML-like templates; checked, never assumed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.config import DataConfig
from fedtune.data.instruct import Conversation, InstructData
from fedtune.data.summary import partition_summary
from fedtune.data.text import CHARS_PER_TOKEN, IGNORE_INDEX
from fedtune.errors import DataError


@dataclass(frozen=True)
class TokenizedChats(Dataset):
    """Token ids and per-token labels (no padding); an item is (input_ids, labels)."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.input_ids[index]), torch.tensor(self.labels[index])

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


def encode_chat(tokenizer, chat: Conversation) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation; labels are IGNORE_INDEX outside assistant turns."""
    messages = chat.messages()
    ids = _render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (role, _) in enumerate(chat.turns):
        if role != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        through = _render(tokenizer, messages[: i + 1])
        if ids[: len(through)] != through or start > len(through):
            raise DataError(f"The model's chat template does not render a conversation as its turns one after "
                            f"another, so fedtune cannot tell the answer's tokens from the prompt's (assistant "
                            f"turn {i + 1} of a conversation starting {messages[0]['content'][:40]!r}). Use "
                            "single-turn records, or a model whose template does.")
        labels[start: len(through)] = ids[start: len(through)]
    return ids, labels


def tokenize_chats(tokenizer, chats: Sequence[Conversation], max_length: int) -> TokenizedChats:
    """Tokenize once, keeping the first `max_length` tokens; counts conversations that were longer.
    A conversation cut inside its prompt keeps no labelled token, so it adds nothing to the loss.
    Each turn is first cut to what max_length tokens can span (data/text.py's CHARS_PER_TOKEN), so
    memory is bounded by max_length, not by the longest text."""
    ids, labels, truncated = [], [], 0
    for chat in chats:
        cut = cut_turns(chat, max_length)
        chat_ids, chat_labels = encode_chat(tokenizer, cut)
        truncated += len(chat_ids) > max_length or cut is not chat
        ids.append(tuple(chat_ids[:max_length]))
        labels.append(tuple(chat_labels[:max_length]))
    return TokenizedChats(tuple(ids), tuple(labels), truncated)


def cut_turns(chat: Conversation, max_length: int) -> Conversation:
    """`chat` with each turn cut to max_length x CHARS_PER_TOKEN characters (`chat` itself if none
    is longer). A turn that long holds at least max_length tokens, so what is cut lies past the
    first max_length tokens of the conversation, which is all that is kept."""
    limit = max_length * CHARS_PER_TOKEN
    if all(len(content) <= limit for _, content in chat.turns):
        return chat
    return Conversation(tuple((role, content[:limit]) for role, content in chat.turns))


def _token_count(tokenizer, chat: Conversation, max_length: int) -> int:
    """Tokens of `chat`, counted on its cut turns; a cut one counts as at least max_length + 1 (truncated)."""
    cut = cut_turns(chat, max_length)
    count = len(encode_chat(tokenizer, cut)[0])
    return count if cut is chat else max(count, max_length + 1)


def chat_summary(fed: InstructData, data: DataConfig, tokenizer, max_length: int) -> dict[str, Any]:
    """The partition summary of data/summary.py for instruction data: conversations per client, the
    demo's urgency mix, and conversations longer than `max_length` tokens."""
    lengths = [_token_count(tokenizer, chat, max_length) for chat in fed.chats]
    return partition_summary(fed, dataclasses.replace(data, partition=fed.partition), lengths, max_length)
