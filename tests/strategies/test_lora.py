"""LoRA-aware aggregation against hand-computed (or independently computed) results: exact
products and what truncation loses, each client's scaling, heterogeneous ranks through a round."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.models.lora_factors import lift, truncate
from fedtune.strategies.build import build_strategy
from fedtune.strategies.lora import ExactLora, RankAwareLora, average_products, exact_average

A, B, HEAD = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.head.weight"


def payload(b, a, head=(0.0,)) -> dict[str, np.ndarray]:
    return {A: np.asarray(a, dtype=np.float32), B: np.asarray(b, dtype=np.float32),
            HEAD: np.asarray(head, dtype=np.float32)}


def test_exact_average_of_two_rank1_updates_is_their_mean_product_when_the_rank_allows():
    # Global rank 2, alpha 2; both clients train rank 1 (scaling alpha/1 = 2), 10 and 30 examples.
    reference = payload(np.zeros((2, 2)), [[1, 0, 0], [0, 1, 0]])
    one = payload([[1], [0]], [[1, 0, 0]])
    two = payload([[0], [2]], [[0, 1, 1]])
    got = exact_average([one, two], [10, 30], reference, alpha=2.0)
    # By hand: 0.25 * 2 * [[1,0,0],[0,0,0]] + 0.75 * 2 * [[0,0,0],[0,2,2]]; the global's scaling is 2/2 = 1.
    np.testing.assert_allclose(got[B] @ got[A], [[0.5, 0, 0], [0, 3, 3]], atol=1e-6)
    np.testing.assert_allclose(got[A] @ got[A].T, np.eye(2), atol=1e-6)  # A: orthonormal rows
    assert got[A].shape == (2, 3) and got[B].shape == (2, 2) and got[A].dtype == np.float32
    assert HEAD not in got  # the head is the inner strategy's


def test_truncation_loses_exactly_the_dropped_singular_values():
    # Rank 1 everywhere, alpha 1: two orthogonal updates, weights 1:3. Their mean has singular values
    # 0.75 and 0.25; rank 1 keeps the larger and loses 0.25 (Frobenius).
    reference = payload(np.zeros((2, 1)), [[0, 0, 1]])
    got = exact_average([payload([[1], [0]], [[1, 0, 0]]), payload([[0], [1]], [[0, 1, 0]])], [1, 3],
                        reference, alpha=1.0)
    np.testing.assert_allclose(got[B] @ got[A], [[0, 0, 0], [0, 0.75, 0]], atol=1e-6)
    factored = average_products([(np.array([[1.0], [0]]), np.array([[1.0, 0, 0]]), 0.25),
                                 (np.array([[0.0], [1]]), np.array([[0.0, 1, 0]]), 0.75)], scale=1.0, rank=1)
    np.testing.assert_allclose(factored.singular_values[:2], [0.75, 0.25])
    assert factored.truncation_error(1) == pytest.approx(0.25)
    assert factored.truncation_error(2) == pytest.approx(0.0, abs=1e-12)


def test_factoring_is_the_best_low_rank_approximation_of_the_dense_sum():
    rng = np.random.default_rng(0)
    terms = [(rng.normal(size=(7, r)), rng.normal(size=(r, 5)), c) for r, c in ((2, 0.3), (3, 0.7), (1, 1.1))]
    dense = sum(c * b @ a for b, a, c in terms)
    u, s, vt = np.linalg.svd(dense)  # computed independently, on the dense (7 x 5) sum
    factored = average_products(terms, scale=0.5, rank=3)
    np.testing.assert_allclose(factored.singular_values[:5], s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(0.5 * factored.b @ factored.a, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-10)
    assert factored.truncation_error(3) == pytest.approx(np.linalg.norm(dense - 0.5 * factored.b @ factored.a))


def test_each_update_counts_with_its_own_scaling_and_is_refactored_with_the_receiving_one():
    # Client 1: alpha 4, rank 1 (scaling 4); client 2: alpha 2, rank 2 (scaling 1); equal weights.
    # Receiving adapter: alpha 4, rank 2 (scaling 2).
    b1, a1 = np.array([[1.0], [0]]), np.array([[1.0, 0]])
    b2, a2 = np.array([[0.0, 0], [3, 0]]), np.array([[0.0, 1], [1, 1]])
    factored = average_products([(b1, a1, 0.5 * 4), (b2, a2, 0.5 * 1)], scale=2.0, rank=2)
    # By hand: 0.5*4*[[1,0],[0,0]] + 0.5*1*[[0,0],[0,3]] = [[2,0],[0,1.5]] = 2 * B·A.
    np.testing.assert_allclose(factored.b @ factored.a, [[1, 0], [0, 0.75]], atol=1e-12)


def test_a_rank_view_computes_the_same_components_and_lifts_back_unchanged():
    rng = np.random.default_rng(1)
    reference = payload(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)), head=[1.0, 2.0])
    view = truncate(reference, 2)
    assert view[A].shape == (2, 5) and view[B].shape == (6, 2)
    alpha = 8.0  # (alpha/2)·B_view·A_view is the first two components of (alpha/4)·B·A
    np.testing.assert_allclose(alpha / 2 * view[B] @ view[A], alpha / 4 * reference[B][:, :2] @ reference[A][:2],
                               rtol=1e-6)
    back = lift(view, reference)  # a client that changed nothing changes nothing
    for name in reference:
        np.testing.assert_allclose(back[name], reference[name], rtol=1e-6)


# ---- through the strategies, with Flower messages ----------------------------------------------

NODES = (7, 9)


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(v, dtype=np.float32)) for name, v in state.items()})


def reply_to(instruction: Message, state: dict[str, np.ndarray], examples: int, rank: int) -> Message:
    content = RecordDict({
        k.ARRAYS: record(state),
        k.METRICS: MetricRecord({k.NUM_EXAMPLES: examples, k.TRAIN_LOSS: 1.0, k.EPSILON: 1.0}),
        k.CLIENT_INFO: ConfigRecord({k.CLIENT_NAME: f"c{instruction.metadata.dst_node_id}",
                                     k.STATUS: k.STATUS_TRAINED, k.LORA_RANK: rank}),
    })
    return Message(content, reply_to=instruction)


def sent(messages, node: int) -> dict[str, np.ndarray]:
    (message,) = [m for m in messages if m.metadata.dst_node_id == node]
    return {name: a.numpy() for name, a in message.content[k.ARRAYS].items()}


def hetero_cfg(aggregation: str, r: int, ranks: str) -> FedtuneConfig:
    return FedtuneConfig(clients=2).with_overrides(
        {"lora.r": r, "lora.client_ranks": ranks, "lora.aggregation": aggregation})


GRID = SimpleNamespace(get_node_ids=lambda: list(NODES))


def test_heterogeneous_ranks_round_trip_server_to_rank4_client_and_back(flower_run):
    strategy = build_strategy(hetero_cfg("naive", 8, "4,8"))
    assert isinstance(strategy, RankAwareLora) and isinstance(strategy.strategy, FedAvg)
    rng = np.random.default_rng(2)
    glob = payload(rng.normal(size=(6, 8)), rng.normal(size=(8, 5)), head=[1.0, 1.0])
    # Round 1: the server has not heard from either node, so both get the global rank; node 7 trains
    # at its own rank 4 (the client takes the rank-4 view itself) and says so.
    first = list(strategy.configure_train(1, record(glob), ConfigRecord({}), GRID))
    assert all(sent(first, node)[A].shape == (8, 5) for node in NODES)
    by_node = {m.metadata.dst_node_id: m for m in first}
    strategy.aggregate_train(1, [reply_to(by_node[7], truncate(sent(first, 7), 4), 10, 4),
                                 reply_to(by_node[9], glob, 10, 8)])
    assert strategy.node_ranks == {7: 4, 9: 8}
    # Round 2: node 7 now gets the rank-4 view, node 9 the global adapter; each in a message of its own.
    second = list(strategy.configure_train(2, record(glob), ConfigRecord({}), GRID))
    to_7, to_9 = sent(second, 7), sent(second, 9)
    np.testing.assert_allclose(to_7[A], glob[A][:4])
    np.testing.assert_allclose(to_7[B], glob[B][:, :4] * 0.5, rtol=1e-6)  # rescaled by 4/8
    np.testing.assert_allclose(to_9[B], glob[B])
    # Node 7 moves its B by delta (10 examples); node 9 sends the global back (30 examples).
    delta = rng.normal(size=(6, 4))
    trained = {**to_7, B: to_7[B] + delta, HEAD: np.array([3.0, 3.0])}
    by_node = {m.metadata.dst_node_id: m for m in second}
    arrays, _ = strategy.aggregate_train(2, [reply_to(by_node[7], trained, 10, 4), reply_to(by_node[9], glob, 30, 8)])
    got = {name: a.numpy() for name, a in arrays.items()}
    # By hand: read back at rank 8, node 7's B is 2·(B/2 + delta) on the first 4 columns and the global's on
    # the others; the weighted mean moves those 4 columns by 0.25·2·delta, and nothing else of the LoRA.
    np.testing.assert_allclose(got[B][:, :4], glob[B][:, :4] + 0.5 * delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[B][:, 4:], glob[B][:, 4:], rtol=1e-6)
    np.testing.assert_allclose(got[A], glob[A], rtol=1e-6)
    np.testing.assert_allclose(got[HEAD], [1.5, 1.5])


def test_exact_with_mixed_ranks_is_the_best_global_rank_fit_of_the_mean_update(flower_run):
    strategy = build_strategy(hetero_cfg("exact", 4, "2,4"))
    assert isinstance(strategy, ExactLora)
    strategy.node_ranks = {7: 2, 9: 4}
    rng = np.random.default_rng(3)
    glob = payload(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)), head=[0.0])
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, record(glob), ConfigRecord({}), GRID)}
    seven = payload(rng.normal(size=(6, 2)), rng.normal(size=(2, 5)), head=[2.0])
    nine = payload(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)), head=[6.0])
    arrays, _ = strategy.aggregate_train(1, [reply_to(messages[7], seven, 30, 2), reply_to(messages[9], nine, 10, 4)])
    got = {name: a.numpy() for name, a in arrays.items()}
    alpha = strategy.alpha
    # Independently, in dense products: each update with its own scaling, plus the global's components
    # 2..4 that node 7 was not sent (they stay for its share), best rank-4 fit with the scaling alpha/4.
    mean = (0.75 * alpha / 2 * seven[B] @ seven[A] + 0.25 * alpha / 4 * nine[B] @ nine[A]
            + 0.75 * alpha / 4 * glob[B][:, 2:] @ glob[A][2:])
    u, s, vt = np.linalg.svd(mean.astype(np.float64))
    np.testing.assert_allclose(alpha / 4 * got[B] @ got[A], (u[:, :4] * s[:4]) @ vt[:4], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[HEAD], [3.0])  # example-weighted mean, as FedAvg
    assert list(got) == list(glob)  # the global order, which the validation and DP wrappers rely on


def test_naive_and_ffa_at_one_rank_are_the_inner_strategy_itself():
    assert type(build_strategy(FedtuneConfig())) is FedAvg
    assert type(build_strategy(FedtuneConfig().with_overrides({"lora.aggregation": "ffa"}))) is FedAvg


@pytest.mark.parametrize("overrides, option", [
    ({"lora.aggregation": "exact", "dp.secagg": True}, "lora.aggregation"),
    ({"lora.client_ranks": "2,4", "dp.secagg": True}, "lora.client_ranks"),
    ({"lora.client_ranks": "2,4", "dp.client_dp": "fixed", "dp.delta": 1e-6}, "lora.client_ranks"),
    ({"lora.aggregation": "exact", "dp.client_dp": "fixed", "dp.delta": 1e-6}, "lora.aggregation"),
    ({"lora.aggregation": "exact", "strategy.name": "fedadam"}, "lora.aggregation"),
    ({"lora.aggregation": "exact", "strategy.robust": "median"}, "lora.aggregation"),
    ({"lora.client_ranks": "2,8"}, "lora.client_ranks"),  # above lora.r = 4
    ({"lora.client_ranks": "2,x"}, "lora.client_ranks"),
    ({"lora.aggregation": "svd"}, "lora.aggregation"),
])
def test_combinations_that_cannot_work_are_refused_naming_the_option(overrides, option):
    with pytest.raises(ConfigError, match=f"`{option}`"):
        FedtuneConfig(clients=4).with_overrides(overrides)


def test_combinations_that_work_are_accepted():
    ok = FedtuneConfig(clients=4)
    assert ok.with_overrides({"lora.aggregation": "ffa", "dp.secagg": True}).dp.secagg
    assert ok.with_overrides({"lora.client_ranks": " 2, 4", "strategy.robust": "median"}).lora.ranks() == (2, 4)
    assert ok.with_overrides({"lora.client_ranks": "2,4", "lora.aggregation": "ffa"}).lora.client_ranks == "2,4"
