"""A client's (train, validation) data, tokenized once per process: its simulated partition of the
run's data, or (deployment) the institution's own file named by node config `data-path`. Under
dp.unit `user` the training records come grouped by user (data/users.py)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from functools import lru_cache
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from torch.utils.data import Dataset

from fedtune import constants as k
from fedtune.client.canaries import CANARY_GRADIENT_SCALE, GradientCanaries
from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.federated import node_data_config
from fedtune.data.users import UserRecords, group_by_user
from fedtune.durable import make_dirs_durable, write_new_atomic
from fedtune.errors import DataError
from fedtune.tasks.base import get_task

Split = tuple[Dataset, Dataset, UserRecords | None]  # train, validation, train grouped by user (None: no users)


@lru_cache(maxsize=4096)
def client_data(data: DataConfig, model: ModelConfig, num_clients: int, seed: int, partition: int) -> Split:
    """(train, validation, train by user) of one simulated client."""
    task = get_task(model.task)
    fed = task.federation(data, num_clients, seed)
    split, tokenizer = fed.clients[partition], task.tokenizer(model)
    train = task.tokenize(tokenizer, fed.select(split.train), model.max_length)
    users = tuple(fed.users[i] for i in split.train) if fed.users else ()
    return train, task.tokenize(tokenizer, fed.select(split.val), model.max_length), _grouped(train, users)


@lru_cache(maxsize=16)
def own_file_data(data: DataConfig, model: ModelConfig, secret: str) -> Split:
    """(train, validation, train by user) from this institution's own file, split by `secret` (split_secret);
    the records never leave the process."""
    task = get_task(model.task)
    tokenizer = task.tokenizer(model)
    train, val, users = task.own_records(data, secret)
    train = task.tokenize(tokenizer, train, model.max_length)
    return train, task.tokenize(tokenizer, val, model.max_length), _grouped(train, users)


@lru_cache(maxsize=4096)
def _canary_rows(data: DataConfig, model: ModelConfig, num_clients: int, seed: int, partition: int) -> tuple[int, ...]:
    fed = get_task(model.task).federation(data, num_clients, seed)
    return fed.canaries.at_rows(fed.clients[partition].train)


def gradient_canaries(cfg: FedtuneConfig, context: Context) -> GradientCanaries | None:
    """The audit's gradient canaries among this simulated client's training records (data.canary_kind
    `gradient`); None when the run plants none, and always for a node that reads its own file."""
    if cfg.data.canary_kind != "gradient" or not cfg.data.canaries or k.DATA_PATH in context.node_config:
        return None
    rows = _canary_rows(cfg.data, cfg.model, int(context.node_config[k.NUM_PARTITIONS]), cfg.seed,
                        int(context.node_config[k.PARTITION_ID]))
    norm = CANARY_GRADIENT_SCALE * cfg.dp.max_grad_norm
    return GradientCanaries(rows, cfg.seed, norm) if any(r >= 0 for r in rows) else None


def _grouped(train: Dataset, users: tuple[str, ...]) -> UserRecords | None:
    """Grouped once with the cached data, not in every round."""
    return group_by_user(train, users) if users else None


SPLIT_SECRET = "validation-split.key"  # in the institution's state-dir
_PROCESS_SECRET = secrets.token_hex(32)  # without a state-dir (the policy then refuses to train)


def split_secret(node_config: Mapping[str, Any]) -> str:
    """The key of this institution's validation split (data/partition.py::in_validation): 32 random bytes made
    once in its state-dir and kept there, never sent. The coordinator knows the run seed; with it as the key it
    could choose, message by message, which records count on which side, and the counts are sent in the clear.
    Under a key it does not know, each record lands in validation with probability val-fraction whatever the
    others, so the two counts tell it no more than their sum, the file's size."""
    directory = str(node_config.get(k.NODE_STATE_DIR, "") or "")
    if not directory:  # an institution without one trains nothing (privacy/policy.py); evaluate still splits
        return _PROCESS_SECRET
    path = Path(directory) / SPLIT_SECRET
    try:
        if not path.exists():
            make_dirs_durable(path.parent)
            try:
                write_new_atomic(path, secrets.token_hex(32).encode(), 0o600)
            except FileExistsError:  # another process of this node made it first: theirs stands
                pass
        secret = path.read_text().strip()
    except OSError as err:
        raise DataError(f"The key of this institution's validation split ({path}, in its node config's "
                        f"`{k.NODE_STATE_DIR}`) could not be made or read: {err.strerror or err}. Make state-dir "
                        "a directory this node can write.") from None
    if not re.fullmatch(r"[0-9a-f]{64}", secret):
        raise DataError(f"{path} is damaged: it should hold the 64 hex digits of this institution's validation-"
                        "split key. Restore it from a backup of state-dir; a new key would move records between "
                        "training and validation.")
    return secret


def local_data(cfg: FedtuneConfig, context: Context) -> tuple[Dataset, Dataset]:
    """The node's own file when its node config names one (`data-path`), else its simulated partition;
    under dp.unit `user`, its training records grouped by user."""
    if k.DATA_PATH in context.node_config:
        data = node_data_config(cfg.data, context.node_config)
        secret = split_secret(context.node_config)
        try:
            train, val, by_user = own_file_data(data, cfg.model, secret)
        except DataError as err:
            # What is wrong with an institution's file can quote its records (a label value and its line), and
            # a failed reply's reason reaches the server and its ledger: the details stay in this node's log.
            log(ERROR, "fedtune: %s", err)
            raise DataError(f"This institution's own data (`{k.DATA_PATH}` in its node config) could not be read "
                            "for this run. Its operator finds the reason in this node's log; it is not sent to "
                            "the server, since it can quote the institution's records.") from None
    else:
        data = cfg.data
        train, val, by_user = client_data(cfg.data, cfg.model, int(context.node_config[k.NUM_PARTITIONS]), cfg.seed,
                                        int(context.node_config[k.PARTITION_ID]))
    if cfg.dp.unit != "user":
        return train, val
    if by_user is None:  # a node's own file names its user column in its own node config (node_data_config)
        raise DataError(f"The run protects each user's records together (dp.unit `user`), but this node names no "
                        f"column of {data.path} that says whose each record is: set node config "
                        f"`{k.DATA_USER_COLUMN}` to it (e.g. {k.DATA_USER_COLUMN}=\"patient_id\").")
    return by_user, val
