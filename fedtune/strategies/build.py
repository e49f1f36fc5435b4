"""Pick Flower's strategy by name, under Flower's client-level DP wrappers when asked.
FedProx's client half lives in client/train.py; client-level DP's in client/mods.py."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedtune.config import FedtuneConfig
from fedtune.strategies.client_dp import with_client_dp
from fedtune.strategies.metrics import aggregate_metrics


def build_strategy(cfg: FedtuneConfig) -> Strategy:
    common = dict(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.clients,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    if cfg.strategy.name == "fedprox":
        strategy = FedProx(proximal_mu=cfg.strategy.proximal_mu, **common)
    else:
        strategy = FedAvg(**common)
    return strategy if cfg.dp.client_dp == "off" else with_client_dp(strategy, cfg)
