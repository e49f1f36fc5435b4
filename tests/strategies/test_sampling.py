"""Flower samples exactly the clients fedtune's config says, whatever the float rounding."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedtune.config import FedtuneConfig, StrategyConfig
from fedtune.errors import ConfigError
from fedtune.strategies.build import build_strategy

pytestmark = pytest.mark.usefixtures("flower_run")


class FakeGrid:
    """Just enough of Flower's Grid for a strategy's configure_* calls."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self):
        return self.nodes

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return (dst_node_id, message_type)


def _sampled(cfg: FedtuneConfig, connected: int | None = None) -> tuple[int, int]:
    strategy, grid = build_strategy(cfg), FakeGrid(connected or cfg.clients)
    train = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    evaluate = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    return len(train), len(evaluate)


@pytest.mark.parametrize("clients, per_round, fraction_evaluate, expected", [
    (1000, 100, 1.0, (100, 100)),  # evaluation follows the sample, not the registered clients
    (100, 29, 0.5, (29, 14)),  # 29 / 100 * 100 floors to 28 in floating point; we still get 29
    (10, 0, 1.0, (10, 10)),  # 0: fraction_train (1.0) of all clients
    (10, 3, 0.0, (3, 0)),  # client-side evaluation off
])
def test_flower_samples_the_configured_clients(clients, per_round, fraction_evaluate, expected):
    cfg = FedtuneConfig(clients=clients, strategy=StrategyConfig(clients_per_round=per_round,
                                                                 fraction_evaluate=fraction_evaluate))
    assert cfg.clients_sampled() == expected[0]
    assert _sampled(cfg) == expected


def test_more_clients_per_round_than_clients_is_refused():
    with pytest.raises(ConfigError, match="strategy.clients_per_round"):
        FedtuneConfig(clients=5, strategy=StrategyConfig(clients_per_round=6))


def test_a_fraction_samples_from_the_connected_clients():
    cfg = FedtuneConfig(clients=10, strategy=StrategyConfig(fraction_train=0.5, fraction_evaluate=0.5))
    assert _sampled(cfg) == (5, 2)


def test_a_round_can_start_while_an_institution_is_down():
    cfg = FedtuneConfig(clients=10, strategy=StrategyConfig(min_available_clients=8))
    assert _sampled(cfg, connected=8) == (8, 8)
