"""FedAvg and FedProx against hand-computed results, and fedtune's metric aggregation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune import constants as k
from fedtune.client.train import proximal_step
from fedtune.config import FedtuneConfig
from fedtune.strategies.build import build_strategy
from fedtune.strategies.metrics import aggregate_metrics


def reply(weights: dict[str, list[float]], num_examples: int, **metrics: float):
    """A stand-in for a Flower reply Message: what aggregate_train reads from one."""
    content = RecordDict({
        k.ARRAYS: ArrayRecord(torch_state_dict={n: torch.tensor(v) for n, v in weights.items()}),
        k.METRICS: MetricRecord({k.NUM_EXAMPLES: num_examples, **metrics}),
    })
    return SimpleNamespace(content=content, has_error=lambda: False)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_aggregate_train_is_the_example_weighted_mean(name):
    strategy = build_strategy(FedtuneConfig().with_overrides({"strategy.name": name}))
    replies = [
        reply({"lora_A": [1.0, 2.0], "head": [0.0]}, 10, train_loss=1.0, epsilon=2.0),
        reply({"lora_A": [3.0, 6.0], "head": [4.0]}, 30, train_loss=3.0, epsilon=1.5),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    # by hand: (10 * x1 + 30 * x2) / 40
    np.testing.assert_allclose(got["lora_A"].numpy(), [2.5, 5.0])
    np.testing.assert_allclose(got["head"].numpy(), [3.0])
    assert metrics["train_loss"] == pytest.approx(2.5)
    assert metrics["epsilon"] == pytest.approx(2.0)  # the worst client, not the mean
    assert metrics[k.NUM_EXAMPLES] == 40


def test_fedprox_sends_mu_and_fedavg_does_not():
    cfg = FedtuneConfig().with_overrides({"strategy.name": "fedprox", "strategy.proximal_mu": 0.3})
    prox, avg = build_strategy(cfg), build_strategy(FedtuneConfig())
    grid = SimpleNamespace(get_node_ids=lambda: [])
    prox.fraction_train = avg.fraction_train = 0.0  # no sampling: inspect only the config edit
    config = ConfigRecord({})
    prox.configure_train(1, ArrayRecord(), config, grid)
    assert config[k.PROXIMAL_MU] == pytest.approx(0.3)
    plain = ConfigRecord({})
    avg.configure_train(1, ArrayRecord(), plain, grid)
    assert k.PROXIMAL_MU not in plain


def test_proximal_step_pulls_towards_the_global_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    anchor = [torch.tensor([0.0, 0.0])]
    proximal_step([w], anchor, lr=0.1, mu=2.0)
    # gradient of (mu/2)||w - w0||^2 is mu (w - w0): w <- w - lr * mu * (w - w0) = 0.8 w
    torch.testing.assert_close(w.detach(), torch.tensor([0.8, -1.6]))


def test_metric_aggregation_handles_zero_examples():
    rows = [RecordDict({"m": MetricRecord({k.NUM_EXAMPLES: 0, "eval_accuracy": 0.5})}),
            RecordDict({"m": MetricRecord({k.NUM_EXAMPLES: 0, "eval_accuracy": 1.0})})]
    assert aggregate_metrics(rows, k.NUM_EXAMPLES)["eval_accuracy"] == pytest.approx(0.75)


def test_bytes_up_is_the_mean_payload_of_the_clients_that_sent_one():
    """Payload size does not grow with a client's data (mixed LoRA ranks make payloads differ),
    and a declined client sends nothing; ε and peak memory take the worst client."""
    def row(examples: int, bytes_up: int, eps: float, rss: float, pid: int) -> RecordDict:
        return RecordDict({"m": MetricRecord({k.NUM_EXAMPLES: examples, k.BYTES_UP: bytes_up, k.EPSILON: eps,
                                              k.PEAK_RSS_MB: rss, k.PID: pid})})

    rows = [row(100, 4000, 1.0, 900.0, 11), row(10, 2000, 3.0, 700.0, 12), row(0, 0, 2.0, 800.0, 13)]
    out = aggregate_metrics(rows, k.NUM_EXAMPLES)
    assert out[k.BYTES_UP] == pytest.approx(3000.0)  # not the example-weighted 3818
    assert out[k.EPSILON] == 3.0 and out[k.PEAK_RSS_MB] == 900.0
    assert k.PID not in out


def test_a_client_without_validation_records_neither_sets_nor_spoils_the_evaluation():
    """Each record's validation side is its own coin (data/partition.py), so a small client may keep none. Its
    scores are NaN with weight 0 (a review: it sent 0.0, and a round in which only such clients evaluated read
    as loss 0.0, which early stopping took for the best round ever)."""
    def row(examples: int, loss: float) -> RecordDict:
        return RecordDict({"m": MetricRecord({k.NUM_EXAMPLES: examples, k.EVAL_LOSS: loss})})

    assert aggregate_metrics([row(3, 0.6), row(0, math.nan), row(1, 0.2)], k.NUM_EXAMPLES)[k.EVAL_LOSS] == \
        pytest.approx(0.5)
    assert math.isnan(aggregate_metrics([row(0, math.nan), row(0, math.nan)], k.NUM_EXAMPLES)[k.EVAL_LOSS])


def test_the_client_app_sends_nan_scores_when_it_has_no_validation_records(monkeypatch, flower_run):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedtune.client import app as client_app
    from fedtune.config import FedtuneConfig
    from fedtune.data.text import TokenizedTexts

    cfg = FedtuneConfig().with_overrides({"dp.enabled": False})
    monkeypatch.setattr(client_app, "local_data", lambda cfg, context: (None, TokenizedTexts((), ())))
    msg = Message(RecordDict({k.CONFIG: ConfigRecord(cfg.to_flat())}), dst_node_id=1, message_type="evaluate")
    context = Context(run_id=1, node_id=1, node_config={k.PARTITION_ID: 0, k.NUM_PARTITIONS: 1}, state=RecordDict(),
                      run_config={})
    metrics = client_app.evaluate(msg, context).content[k.METRICS]
    assert metrics[k.NUM_EXAMPLES] == 0 and math.isnan(metrics[k.EVAL_LOSS]) and math.isnan(metrics[k.EVAL_ACCURACY])
