"""A client's instruction data for the causal-LM task, tokenized once per process (the counterpart of
client_data / own_file_data in client/app.py)."""

from __future__ import annotations

from functools import lru_cache

from fedtune.config import DataConfig, ModelConfig
from fedtune.data.chat import TokenizedChats, tokenize_chats
from fedtune.data.instruct import federated_instructions, local_instructions
from fedtune.models.build import load_tokenizer


@lru_cache(maxsize=4096)
def client_chats(data: DataConfig, model: ModelConfig, num_clients: int, seed: int,
                 partition: int) -> tuple[TokenizedChats, TokenizedChats]:
    """(train, validation) conversations of one simulated client."""
    fed = federated_instructions(data, num_clients, seed)
    split = fed.clients[partition]
    tokenizer = load_tokenizer(model.name_or_path, model.task)
    return (tokenize_chats(tokenizer, fed.select(split.train), model.max_length),
            tokenize_chats(tokenizer, fed.select(split.val), model.max_length))


@lru_cache(maxsize=16)
def own_file_chats(data: DataConfig, model: ModelConfig, seed: int) -> tuple[TokenizedChats, TokenizedChats]:
    """(train, validation) conversations from this institution's own file (deployment)."""
    tokenizer = load_tokenizer(model.name_or_path, model.task)
    train, val = local_instructions(data, seed)
    return tokenize_chats(tokenizer, train, model.max_length), tokenize_chats(tokenizer, val, model.max_length)
