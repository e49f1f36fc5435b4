"""SecAgg+ over the adapter: Flower's real workflow and client mod, through an in-process grid.

The grid below hands each message to the ClientApp's train chain (secagg_mod, then the
client-level DP clipping mod, then a fake train handler) and keeps every reply the server got,
so the tests can check both the aggregate and what the server saw on the way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.common.constant import ErrorCode
from rich.progress import Progress

from fedtune import constants as k
from fedtune.client.mods import client_clipping_mod
from fedtune.client.secagg import secagg_mod, secagg_range
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.server.secagg import secure_exchange
from fedtune.strategies.build import build_strategy

NAMES = ["lora_A", "lora_B", "head"]

pytestmark = pytest.mark.usefixtures("flower_run")


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"lora_A": rng.normal(0, 0.05, (4, 6)), "lora_B": np.zeros((6, 4)), "head": rng.normal(0, 0.1, 50)}


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={n: torch.tensor(arrays[n], dtype=torch.float32) for n in NAMES})


def update(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, scale, a.shape) for n, a in global_arrays().items()}


def trainer(node: int, change: dict[str, np.ndarray] | None, seen: dict[int, Message]):
    """A train handler: adds `change` to what it received, or declines (None). Keeps what it got."""
    def handle(msg: Message, context: Context) -> Message:
        seen[node] = msg
        metrics = MetricRecord({k.NUM_EXAMPLES: 10 * node, k.TRAIN_LOSS: 0.5, k.EPSILON: float(node)})
        info = ConfigRecord({k.CLIENT_NAME: f"client-{node}",
                             k.STATUS: k.STATUS_DECLINED if change is None else k.STATUS_TRAINED})
        content = RecordDict({k.METRICS: metrics, k.CLIENT_INFO: info})
        if change is not None:
            got = {n: t.numpy().astype(np.float64) for n, t in msg.content[k.ARRAYS].to_torch_state_dict().items()}
            content[k.ARRAYS] = record({n: got[n] + change[n] for n in NAMES})
        return Message(content, reply_to=msg)
    return handle


class LoopbackGrid:
    """Delivers each message to one node's ClientApp chain in this process; records the replies."""

    def __init__(self, changes: dict[int, dict[str, np.ndarray] | None], crash_in_training: int | None = None):
        self.received: dict[int, Message] = {}
        self.apps = {node: make_ffn(self._crashing if node == crash_in_training else
                                    trainer(node, change, self.received), [secagg_mod, client_clipping_mod])
                     for node, change in changes.items()}
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in changes}
        self.replies: list[Message] = []
        self.sent: list[Message] = []

    @staticmethod
    def _crashing(msg: Message, context: Context) -> Message:
        raise RuntimeError("out of memory")

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            msg = copy.deepcopy(msg)  # each node gets its own copy, as over the wire (the stages share content)
            try:
                out.append(self.apps[node](msg, self.contexts[node]))
            except Exception as err:  # a ClientApp that raises answers with an error reply
                out.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg))
        self.replies.extend(out)
        return out


def run_round(cfg: FedtuneConfig, grid: LoopbackGrid):
    strategy = build_strategy(cfg)
    messages = list(strategy.configure_train(1, record(global_arrays()), ConfigRecord(cfg.to_flat()), grid))
    with Progress(disable=True) as progress:
        replies = secure_exchange(grid, messages, "round 1/1 train", progress, timeout_s=None)
    return strategy, replies


def arrays_of(reply: Message) -> dict[str, np.ndarray]:
    return {n: t.numpy().astype(np.float64) for n, t in reply.content[k.ARRAYS].to_torch_state_dict().items()}


def cfg_for(clients: int, **dp) -> FedtuneConfig:
    return FedtuneConfig().with_overrides({"clients": clients, "dp.secagg": True,
                                           **{f"dp.{key}": v for key, v in dp.items()}})


def test_the_server_gets_the_mean_of_the_trained_updates_and_never_an_update():
    changes = {1: update(1), 2: update(2), 3: update(3), 4: None}  # client 4 declines
    grid = LoopbackGrid(changes)
    _, replies = run_round(cfg_for(4), grid)
    g = global_arrays()
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_node) == [1, 2, 3, 4] and not any(r.has_error() for r in replies)
    expected = {n: g[n] + sum(changes[i][n] for i in (1, 2, 3)) / 3 for n in NAMES}
    for node in (1, 2, 3):
        got = arrays_of(by_node[node])
        for n in NAMES:
            np.testing.assert_allclose(got[n], expected[n], atol=2e-5)  # 2^22-level quantization over ±8
    # the declined client's reply has no arrays; every client's metrics and status came in plaintext
    assert k.ARRAYS not in by_node[4].content
    assert by_node[4].content[k.CLIENT_INFO][k.STATUS] == k.STATUS_DECLINED
    assert [by_node[i].content[k.METRICS][k.EPSILON] for i in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]
    assert by_node[2].content[k.METRICS][k.NUM_EXAMPLES] == 20
    # what crossed the wire: no reply to the server carried a readable array
    assert grid.replies and all(len(a) == 0 for r in grid.replies if not r.has_error()
                                for a in r.content.array_records.values())
    # the train handler got our usual message: names, arrays and the run's config
    seen = grid.received[1].content
    assert list(seen[k.ARRAYS].keys()) == NAMES and seen[k.CONFIG][k.SERVER_ROUND] == 1
    assert "secaggplus_configs" not in seen.config_records


def test_a_client_that_fails_drops_out_and_the_others_are_still_summed():
    changes = {1: update(1), 2: update(2), 3: update(3), 4: update(4)}
    grid = LoopbackGrid(changes, crash_in_training=2)
    _, replies = run_round(cfg_for(4), grid)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert by_node[2].has_error() and "secure aggregation" in by_node[2].error.reason
    assert "out of memory" in by_node[2].error.reason
    g = global_arrays()
    got = arrays_of(by_node[1])
    np.testing.assert_allclose(got["head"], g["head"] + sum(changes[i]["head"] for i in (1, 3, 4)) / 3, atol=2e-5)


def test_client_side_client_level_dp_under_secagg():
    # clients clip (the mod inside secagg_mod), the server sees only the sum, ZeroFilledMean divides by m
    changes = {1: update(1, scale=1.0), 2: update(2, scale=0.001), 3: None}
    grid = LoopbackGrid(changes)
    strategy, replies = run_round(cfg_for(3, client_dp="fixed", client_dp_side="client", client_noise_multiplier=0.0,
                                          client_clipping_norm=0.5), grid)
    trained = [r for r in replies if not r.has_error() and r.content[k.CLIENT_INFO][k.STATUS] == k.STATUS_TRAINED]
    arrays, _ = strategy.aggregate_train(1, trained)
    g = global_arrays()
    norm1 = np.sqrt(sum((a ** 2).sum() for a in changes[1].values()))
    assert norm1 > 0.5  # so client 1 was clipped, client 2 (tiny) was not
    got = {n: t.numpy().astype(np.float64) for n, t in arrays.to_torch_state_dict().items()}
    for n in NAMES:
        expected = g[n] + (changes[1][n] * 0.5 / norm1 + changes[2][n]) / 3
        np.testing.assert_allclose(got[n], expected, atol=2e-5)


def test_a_value_outside_the_quantization_range_is_refused_not_clipped():
    changes = {1: update(1), 2: {**update(2), "head": np.full(50, 20.0)}, 3: update(3)}
    grid = LoopbackGrid(changes)
    _, replies = run_round(cfg_for(3), grid)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert by_node[2].has_error()
    assert not by_node[1].has_error() and np.abs(arrays_of(by_node[1])["head"]).max() < 1


def test_normal_rounds_pass_through_the_secagg_mod():
    out = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg = Message(RecordDict({k.CONFIG: ConfigRecord({"dp.secagg": False})}), dst_node_id=1, message_type="train")
    assert secagg_mod(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                      lambda m, c: out) is out


@pytest.mark.parametrize("overrides, says", [
    ({"dp.client_dp": "fixed", "dp.client_dp_side": "server"}, "set dp.client_dp_side to `client`"),
    ({"clients": 1}, "at least 2 clients"),
    ({"clients": 4, "strategy.fraction_train": 0.25}, "at least 2 clients"),
])
def test_secagg_options_that_cannot_work_are_refused(overrides, says):
    with pytest.raises(ConfigError, match="dp.secagg") as err:
        FedtuneConfig().with_overrides({"dp.secagg": True, **overrides})
    assert says in str(err.value)
    FedtuneConfig().with_overrides({"dp.secagg": True, "dp.client_dp": "adaptive", "dp.client_dp_side": "client"})


def integer_share(change: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An integer share K (privacy/dpsgd.py::IntegerShare) standing for a step of this size."""
    return {n: np.rint(change[n] * 1e5).astype(np.int64) for n in NAMES}


def ddp_trainer(node: int, change: dict[str, np.ndarray] | None, cfg: FedtuneConfig):
    """The client app's distributed-DP reply (client/app.py): its integer share, encoded for SecAgg+."""
    from fedtune.privacy.distributed import encode

    def handle(msg: Message, context: Context) -> Message:
        records = 10 * node
        metrics = MetricRecord({k.NUM_EXAMPLES: records, k.TRAIN_LOSS: 0.5, k.EPSILON: 1.0})
        info = ConfigRecord({k.CLIENT_NAME: f"client-{node}", k.STATUS: k.STATUS_TRAINED})
        share = integer_share(change)
        arrays = ArrayRecord({n: Array(encode(share[n], secagg_range(context))) for n in NAMES})
        return Message(RecordDict({k.METRICS: metrics, k.CLIENT_INFO: info, k.ARRAYS: arrays}), reply_to=msg)
    return handle


def ddp_grid(cfg: FedtuneConfig, changes: dict[int, dict[str, np.ndarray]], crash: int | None = None) -> LoopbackGrid:
    grid = LoopbackGrid(changes, crash_in_training=crash)
    for node, change in changes.items():
        if node != crash:
            grid.apps[node] = make_ffn(ddp_trainer(node, change, cfg), [secagg_mod, client_clipping_mod])
    return grid


def test_distributed_dp_steps_by_the_record_weighted_sum_of_the_shares():
    cfg = FedtuneConfig().with_overrides({"clients": 4, "dp.secagg": True, "dp.distributed_min_honest": 4,
                                          "train.optimizer": "sgd"})
    changes = {node: update(node, scale=0.3) for node in (1, 2, 3, 4)}
    _, replies = run_round(cfg, ddp_grid(cfg, changes))
    assert not any(r.has_error() for r in replies)
    from fedtune.privacy.distributed import step_scale

    # θ + (−lr/(q·γ))·Σ K / Σ n_i: FedAvg of the institutions' steps, from the exact integer sum
    g, total = global_arrays(), sum(10 * node for node in changes)
    scale = step_scale(cfg.train.learning_rate, cfg.train.sample_rate, cfg.dp.max_grad_norm)
    shares = [integer_share(change) for change in changes.values()]
    expected = {n: g[n] + scale * sum(share[n] for share in shares) / total for n in NAMES}
    for reply in replies:
        for n, value in arrays_of(reply).items():
            np.testing.assert_allclose(value, expected[n], atol=1e-6, rtol=1e-6)  # float32's rounding only


@pytest.mark.parametrize("coordinate, warned", [(100.0, False), (400.0, True)])
def test_a_distributed_dp_sum_near_the_edge_of_secaggs_range_is_warned_about(coordinate, warned):
    """Four shares of 10^7 or 4·10^7 in one coordinate sum to 15% or 60% of Q/2 = 2^28 (Q for four
    institutions): past half of it the coordinator says the sum could soon wrap around."""
    import io

    from rich.console import Console

    cfg = FedtuneConfig().with_overrides({"clients": 4, "dp.secagg": True, "dp.distributed_min_honest": 4,
                                          "train.optimizer": "sgd"})
    changes = {node: update(node) for node in (1, 2, 3, 4)}
    for change in changes.values():
        change["head"][0] = coordinate  # integer_share scales by 10^5
    strategy = build_strategy(cfg)
    messages = list(strategy.configure_train(1, record(global_arrays()), ConfigRecord(cfg.to_flat()),
                                             ddp_grid(cfg, changes)))
    out = io.StringIO()
    with Progress(console=Console(file=out, width=200), disable=True) as progress:
        replies = secure_exchange(ddp_grid(cfg, changes), messages, "round 1/1 train", progress, timeout_s=None)
    assert not any(r.has_error() for r in replies)
    assert ("used 60% of SecAgg+'s range" in out.getvalue()) == warned, out.getvalue()


def test_distributed_dp_never_unmasks_a_sum_with_fewer_than_t_noise_shares():
    cfg = FedtuneConfig().with_overrides({"clients": 4, "dp.secagg": True, "dp.distributed_min_honest": 4,
                                          "train.optimizer": "sgd"})
    changes = {node: update(node) for node in (1, 2, 3, 4)}
    grid = ddp_grid(cfg, changes, crash=2)
    _, replies = run_round(cfg, grid)
    assert all(r.has_error() for r in replies), "three shares are fewer than t = 4: no sum is revealed"
    refusals = [r for r in grid.replies if r.has_error() and "not unmasking" in r.error.reason]
    assert len(refusals) == 3


def test_distributed_dp_outside_secagg_is_refused_before_training():
    """An institution under distributed DP adds only σ/√t, which SecAgg+'s masks hide. A coordinator
    that sends the same round as a plain train message would get that share in the clear."""
    trained = []
    plain = Message(RecordDict({k.CONFIG: ConfigRecord({"dp.secagg": True, "dp.distributed_min_honest": 4})}),
                    dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="outside SecAgg"):
        secagg_mod(plain, context, lambda m, c: trained.append(m))
    assert trained == []


def test_distributed_dp_does_not_train_when_fewer_than_t_institutions_are_left_after_key_sharing():
    """A review's case: one institution dropped during key sharing with t = m; the others trained, spent ε and
    then refused to unmask. Each sees before training how many are left (one ciphertext from every other)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from fedtune.client.secagg import FITINS_CONFIG

    def masking(others: int) -> Message:
        stage = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [b"x"] * others,
                 Key.SOURCE_LIST: list(range(others))}
        return Message(RecordDict({
            RECORD_KEY_CONFIGS: ConfigRecord(stage),
            FITINS_CONFIG: ConfigRecord({"dp.distributed_min_honest": 4})}), dst_node_id=1, message_type="train")

    trained = []
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="not training"):
        secagg_mod(masking(2), context, lambda m, c: trained.append(m))
    assert trained == []
    from fedtune.client.secagg import _refuse_to_train_for_a_sum_never_unmasked
    assert _refuse_to_train_for_a_sum_never_unmasked(masking(3)) is None, "four left, itself included: t = 4 met"


def test_the_record_counts_beside_a_masked_sum_cannot_break_or_dominate_the_distributed_step():
    """A hostile node's review: Σ n_i divided the decoded sum with each count as stated, so a missing, NaN or
    ∞ count raised through the round, 0 or a negative one made the step NaN or ∞ or scaled every other
    institution's update up, and a huge one skipped the 10× weight cap aggregation applies elsewhere."""
    from fedtune.server.secagg import usable_records

    assert usable_records([40, 60, 50]) == 150
    assert usable_records([40, 60, None]) == usable_records([40, 60, float("nan")]) == 140  # the median stands in
    assert usable_records([40, 60, -100]) == usable_records([40, 60, 0]) == usable_records([40, 60, True]) == 140
    assert usable_records([40, 60, 10**8]) == 40 + 60 + 600  # at most 10× the lower median (60)
    assert usable_records([None]) == 1.0


@pytest.mark.parametrize("clients", [2, 3, 4, 5, 7, 10])
def test_the_reports_threshold_sentence_is_the_threshold_flower_sends_in_setup(clients):
    """The privacy report says the server needs max(2, round(2m/3)) institutions' shares to unmask one;
    that is only true if Flower's SecAgg+ setup, with fedtune's arguments, sends that threshold."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedtune.privacy.report.prose import _threshold_example
    grid = LoopbackGrid({node: update(node) for node in range(1, clients + 1)})
    run_round(cfg_for(clients), grid)
    setup = [r for r in grid.replies if not r.has_error() and RECORD_KEY_CONFIGS in r.content.config_records]
    sent = {(m.content.config_records[RECORD_KEY_CONFIGS][Key.THRESHOLD],
             m.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_NUMBER])
            for m in grid.sent if RECORD_KEY_CONFIGS in m.content.config_records
            and Key.THRESHOLD in m.content.config_records[RECORD_KEY_CONFIGS]}
    assert setup and len(sent) == 1
    threshold, shares = sent.pop()
    assert shares == clients  # every institution holds a share of every other's key
    assert _threshold_example(clients) == f", {threshold} of the {clients} this run samples a round when all take part"
