"""Pick Flower's strategy by name. FedProx's client half lives in client/train.py."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx

from fedtune.config import FedtuneConfig
from fedtune.strategies.metrics import aggregate_metrics


def build_strategy(cfg: FedtuneConfig) -> FedAvg:
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
        return FedProx(proximal_mu=cfg.strategy.proximal_mu, **common)
    return FedAvg(**common)
