"""Simulation warm-up: one `query.warm_up` message per worker before round 1, answered by the
ClientApp after it has loaded what its clients share; a silent worker cannot stall the run."""

from __future__ import annotations

import time

import pytest
from flwr.app import Context, Message, RecordDict

from fedtune import constants as k
from fedtune.client import app as client_app
from fedtune.client.data import client_data
from fedtune.config import FedtuneConfig
from fedtune.data.demo import LABELS
from fedtune.models.build import build_model
from fedtune.server.warm_up import finish_warm_up, start_warm_up

pytestmark = pytest.mark.usefixtures("in_flower_run")

CFG = FedtuneConfig.from_flat({"clients": 4, "dp.enabled": False, "data.demo_examples": 80, "lora.r": 2})
MIXED = CFG.with_overrides({"lora.r": 4, "lora.client_ranks": "2,4"})  # node 0 trains rank 2


class WorkerGrid:
    """Nodes whose messages the real ClientApp handlers answer in this process, unless `silent`.
    Nodes register only after `register_after` calls to get_node_ids, as simulated ones do."""

    def __init__(self, nodes: int, silent: bool = False, register_after: int = 0):
        self.nodes, self.silent, self.register_after = list(range(10, 10 + nodes)), silent, register_after
        self.pushed: list[Message] = []

    def get_node_ids(self) -> list[int]:
        self.register_after -= 1
        return self.nodes if self.register_after < 0 else []

    def push_messages(self, messages):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's grids do
            self.pushed.append(msg)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        if self.silent:
            return []
        out = []
        for msg in [m for m in self.pushed if m.metadata.message_id in set(message_ids)]:
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={k.PARTITION_ID: self.nodes.index(node), k.NUM_PARTITIONS: CFG.clients})
            out.append(client_app.warm_up(msg, context))
        return out


def test_one_message_per_worker_each_to_another_node_with_the_run_config():
    grid = WorkerGrid(nodes=4, register_after=3)
    sent = start_warm_up(grid, CFG, workers=2)
    assert len(sent) == 2
    assert [m.metadata.message_type for m in grid.pushed] == [k.WARM_UP] * 2
    assert len({m.metadata.dst_node_id for m in grid.pushed}) == 2
    assert FedtuneConfig.from_flat(dict(grid.pushed[0].content[k.CONFIG])) == CFG


@pytest.mark.parametrize("cfg", [CFG, MIXED], ids=["one-rank", "mixed-ranks"])
def test_after_the_warm_up_the_worker_holds_the_model_and_its_clients_data(cfg):
    build_model.cache_clear()
    client_data.cache_clear()
    grid = WorkerGrid(nodes=4)
    assert finish_warm_up(grid, start_warm_up(grid, cfg, workers=1), timeout_s=60)[1] == 0
    assert build_model.cache_info().currsize == 1
    assert client_data.cache_info().currsize == 1
    arrays = client_app.to_record(build_model(cfg.model, cfg.lora, len(LABELS), cfg.seed))  # the global rank
    before = build_model.cache_info()
    client_app._model(cfg, arrays, Context(run_id=1, node_id=10, node_config={k.PARTITION_ID: 0},
                                           state=RecordDict(), run_config={}))
    after = build_model.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)  # round 1's first client reuses it


def test_a_worker_that_never_answers_delays_round_1_by_the_timeout_only():
    grid = WorkerGrid(nodes=2, silent=True)
    sent = start_warm_up(grid, CFG, workers=2)
    started = time.monotonic()
    waited, failed = finish_warm_up(grid, sent, timeout_s=0.3)
    assert 0.3 <= waited < 2 and time.monotonic() - started < 2
    assert failed == 2
