"""Pick Flower's strategy by name, under Flower's client-level DP wrappers when asked.
FedProx's client half lives in client/train.py; client-level DP's in client/mods.py."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedtune.config import FedtuneConfig
from fedtune.strategies.client_dp import with_client_dp
from fedtune.strategies.metrics import aggregate_metrics


def build_strategy(cfg: FedtuneConfig) -> Strategy:
    common = dict(
        **_sampling(cfg),
        min_available_nodes=cfg.strategy.min_available_clients or cfg.clients,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    if cfg.strategy.name == "fedprox":
        strategy = FedProx(proximal_mu=cfg.strategy.proximal_mu, **common)
    else:
        strategy = FedAvg(**common)
    return strategy if cfg.dp.client_dp == "off" else with_client_dp(strategy, cfg)


def _sampling(cfg: FedtuneConfig) -> dict[str, float | int]:
    """Flower samples max(int(connected * fraction), min_nodes). A fixed count is given as both
    fraction and minimum, so it is exact whatever the float rounding of count / clients; a
    fraction stays a fraction of the clients connected at the time."""
    s = cfg.strategy
    if s.clients_per_round:
        sampled, evaluating = cfg.clients_sampled(), cfg.clients_evaluating()
        return dict(fraction_train=sampled / cfg.clients, min_train_nodes=sampled,
                    fraction_evaluate=evaluating / cfg.clients, min_evaluate_nodes=max(evaluating, 1))
    return dict(fraction_train=s.fraction_train, min_train_nodes=1,
                fraction_evaluate=s.fraction_train * s.fraction_evaluate, min_evaluate_nodes=1)
