"""Pick Flower's strategy by name, under fedtune's robust-aggregation wrapper and Flower's
client-level DP wrappers when asked (docs/architecture.md, "How strategies compose").
FedProx's client half lives in client/train.py; client-level DP's in client/mods.py."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedtune.config import SERVER_OPTIMIZERS, FedtuneConfig
from fedtune.strategies.client_dp import with_client_dp
from fedtune.strategies.lora import with_lora_aggregation
from fedtune.strategies.metrics import aggregate_metrics
from fedtune.strategies.robust import RobustAggregation
from fedtune.strategies.server_opt import build_server_optimizer


def build_strategy(cfg: FedtuneConfig) -> Strategy:
    common = dict(
        **_sampling(cfg),
        min_available_nodes=cfg.strategy.min_available_clients or cfg.clients,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    s = cfg.strategy
    if s.name == "fedprox":
        strategy = FedProx(proximal_mu=s.proximal_mu, **common)
    elif s.name in SERVER_OPTIMIZERS:
        strategy = build_server_optimizer(s.name, common, s.effective_server_learning_rate(), s.server_momentum,
                                          s.beta_1, s.beta_2, s.tau)
    else:
        strategy = FedAvg(**common)
    if s.robust != "off":  # config.py refuses it with client-level DP and SecAgg+
        strategy = RobustAggregation(strategy, s.robust, s.trim_fraction)
    if cfg.dp.client_dp != "off":
        strategy = with_client_dp(strategy, cfg)
    # Outermost: replies of other ranks are lifted to the global rank before anything inside sees
    # them (strategies/lora.py); config.py refuses exact and mixed ranks with client-level DP.
    return with_lora_aggregation(strategy, cfg)


def _sampling(cfg: FedtuneConfig) -> dict[str, float | int]:
    """Flower samples max(int(connected * fraction), min_nodes). A fixed count is given as both
    fraction and minimum, so it is exact whatever the float rounding of count / clients; a
    fraction stays a fraction of the clients connected at the time. Under client-level DP every
    connected node is asked, and strategies/cohort.py keeps each by its own coin flip."""
    s = cfg.strategy
    if s.clients_per_round:
        sampled, evaluating = cfg.clients_sampled(), cfg.clients_evaluating()
        sampling = dict(fraction_train=sampled / cfg.clients, min_train_nodes=sampled,
                        fraction_evaluate=evaluating / cfg.clients, min_evaluate_nodes=max(evaluating, 1))
    else:
        sampling = dict(fraction_train=s.fraction_train, min_train_nodes=1,
                        fraction_evaluate=s.fraction_train * s.fraction_evaluate, min_evaluate_nodes=1)
    if cfg.dp.client_dp != "off":
        sampling.update(fraction_train=1.0, min_train_nodes=1)
    return sampling
