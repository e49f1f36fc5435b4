"""A client's (train, validation) data, tokenized once per process: its simulated partition of the
run's data, or (deployment) the institution's own file named by node config `data-path`."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context
from torch.utils.data import Dataset

from fedtune import constants as k
from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.federated import node_data_config
from fedtune.tasks.base import get_task


@lru_cache(maxsize=4096)
def client_data(data: DataConfig, model: ModelConfig, num_clients: int, seed: int,
                partition: int) -> tuple[Dataset, Dataset]:
    """(train, validation) of one simulated client."""
    task = get_task(model.task)
    fed = task.federation(data, num_clients, seed)
    split, tokenizer = fed.clients[partition], task.tokenizer(model)
    return (task.tokenize(tokenizer, fed.select(split.train), model.max_length),
            task.tokenize(tokenizer, fed.select(split.val), model.max_length))


@lru_cache(maxsize=16)
def own_file_data(data: DataConfig, model: ModelConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation) from this institution's own file; the records never leave the process."""
    task = get_task(model.task)
    tokenizer = task.tokenizer(model)
    train, val = task.own_records(data, seed)
    return task.tokenize(tokenizer, train, model.max_length), task.tokenize(tokenizer, val, model.max_length)


def local_data(cfg: FedtuneConfig, context: Context) -> tuple[Dataset, Dataset]:
    """The node's own file when its node config names one (`data-path`), else its simulated partition."""
    if k.DATA_PATH in context.node_config:
        return own_file_data(node_data_config(cfg.data, context.node_config), cfg.model, cfg.seed)
    return client_data(cfg.data, cfg.model, int(context.node_config[k.NUM_PARTITIONS]), cfg.seed,
                       int(context.node_config[k.PARTITION_ID]))
