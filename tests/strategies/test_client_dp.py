"""Client-level DP: Flower's wrappers as fedtune composes them, against hand-computed results.

Fake replies are real Flower Messages carrying ArrayRecords; no model, no training."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedtune import constants as k
from fedtune.client.mods import client_clipping_mod
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.client_level import client_level_epsilon
from fedtune.strategies.build import build_strategy
from fedtune.strategies.client_dp import (
    ClientSideAdaptive,
    ClientSideFixed,
    ServerSideAdaptive,
    ServerSideFixed,
    ZeroFilledMean,
)
from fedtune.strategies.wrapper import layers, load_state_dict, state_dict

SIZE = 4000  # elements in the big array: enough to measure a noise std to a few percent

pytestmark = pytest.mark.usefixtures("flower_run")


def cfg_for(clipping: str = "fixed", side: str = "server", z: float = 0.0, c: float = 1.0, clients: int = 4,
            fraction: float = 1.0) -> FedtuneConfig:
    return FedtuneConfig().with_overrides({
        "clients": clients, "strategy.fraction_train": fraction, "dp.client_dp": clipping,
        "dp.client_dp_side": side, "dp.client_noise_multiplier": z, "dp.client_clipping_norm": c})


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={n: torch.tensor(a, dtype=torch.float32) for n, a in arrays.items()})


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"lora_A": rng.normal(size=(2, 3)).astype(np.float32), "head": rng.normal(size=SIZE).astype(np.float32)}


def update_of_norm(norm: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = {"lora_A": rng.normal(size=(2, 3)), "head": rng.normal(size=SIZE)}
    scale = norm / np.sqrt(sum((a ** 2).sum() for a in u.values()))
    return {n: a * scale for n, a in u.items()}


def reply(g: dict[str, np.ndarray], update: dict[str, np.ndarray], num_examples: int = 10,
          **metrics: float) -> Message:
    content = RecordDict({
        k.ARRAYS: record({n: g[n] + update[n] for n in g}),
        k.METRICS: MetricRecord({k.NUM_EXAMPLES: num_examples, k.TRAIN_LOSS: 1.0, **metrics}),
    })
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def grid(nodes: int):
    return SimpleNamespace(get_node_ids=lambda: list(range(1, nodes + 1)))


def configure(strategy, g, nodes: int = 4) -> ConfigRecord:
    config = ConfigRecord({})
    list(strategy.configure_train(1, record(g), config, grid(nodes)))  # the cohort may be empty (q < 1)
    return config


def delta_of(arrays: ArrayRecord, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    got = {n: t.numpy().astype(np.float64) for n, t in arrays.to_torch_state_dict().items()}
    return {n: got[n] - g[n] for n in g}


def test_client_level_delta_must_be_below_one_over_the_number_of_clients():
    with pytest.raises(ConfigError, match="dp.delta"):
        FedtuneConfig().with_overrides({"clients": 10, "dp.delta": 0.2, "dp.client_dp": "fixed"})
    FedtuneConfig().with_overrides({"clients": 10, "dp.delta": 0.05, "dp.client_dp": "fixed"})
    FedtuneConfig().with_overrides({"clients": 10, "dp.delta": 0.2, "dp.enabled": False})  # not checked when off


def test_off_is_plain_fedavg_and_has_no_ledger_entry():
    strategy = build_strategy(FedtuneConfig())
    assert type(strategy).__name__ == "FedAvg"
    assert "client_level" not in state_dict(strategy)


@pytest.mark.parametrize("clipping, side, cls", [
    ("fixed", "server", ServerSideFixed), ("fixed", "client", ClientSideFixed),
    ("adaptive", "server", ServerSideAdaptive), ("adaptive", "client", ClientSideAdaptive),
])
def test_options_pick_flowers_wrapper(clipping, side, cls):
    strategy = build_strategy(cfg_for(clipping, side, z=0.5))
    assert type(strategy) is cls
    assert strategy.num_sampled_clients == 4


def test_server_side_clips_each_update_and_averages_over_the_sampled_count():
    g = global_arrays()
    strategy = build_strategy(cfg_for(z=0.0, c=1.0))
    configure(strategy, g)
    big, small = update_of_norm(5.0, 1), update_of_norm(0.5, 2)
    # weights 1 and 1000 examples: client-level DP must ignore them (each institution counts once)
    arrays, metrics = strategy.aggregate_train(1, [reply(g, big, 1), reply(g, small, 1000)])
    got = delta_of(arrays, g)
    # by hand: big is scaled to norm 1, small (0.5 < 1) is kept; 2 updates over m = 4 sampled
    for n in g:
        np.testing.assert_allclose(got[n], (big[n] / 5.0 + small[n]) / 4, atol=2e-6)
    assert metrics[k.NUM_EXAMPLES] == 1001  # metrics still come from FedAvg's aggregation


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_server_side_updates_stay_within_the_clipping_norm_after_float32_rounding(clipping):
    """Flower clips each update to C in float32 and hands on the clipped weights b + u, rounded to
    float32; the update recovered from them, (b + u) - b, could exceed C (a review measured 1.000009·C),
    and the noise is calibrated to C. ZeroFilledMean scales it back to C."""
    d, spacing = 1000, 2.0 ** -23  # float32's spacing in [1, 2)
    g = {"head": np.full(d, 1.5, dtype=np.float32)}
    steps = np.floor(0.05 / np.sqrt(d) / spacing)
    # an update already clipped to C, each value 0.7 spacing past a float32: b + u rounds away from b
    clipped = (steps + 0.7) * spacing * np.where(np.arange(d) % 2, 1.0, -1.0)
    c = float(np.sqrt((clipped ** 2).sum()))
    strategy = build_strategy(cfg_for(clipping, z=0.0, c=c, clients=1))
    configure(strategy, g, nodes=1)
    # ZeroFilledMean's copy of the global arrays in float64 (the same values), so that its mean is not
    # rounded to float32 and shows the update it summed (m = 1); Flower still clips in float32
    (zero_filled,) = [layer for layer in layers(strategy) if isinstance(layer, ZeroFilledMean)]
    zero_filled.current_arrays = ArrayRecord({"head": Array(g["head"].astype(np.float64))})
    arrays, _ = strategy.aggregate_train(1, [reply(g, {"head": 10 * clipped})])
    summed = arrays["head"].numpy() - g["head"].astype(np.float64)
    norm = np.sqrt((summed ** 2).sum())
    assert c * (1 - 1e-4) < norm <= c * (1 + 1e-12), f"{norm / c:.7f}·C"


@pytest.mark.parametrize("side", ["server", "client"])
def test_the_mean_meets_the_noise_in_float64_and_the_release_has_the_models_dtype(side, monkeypatch):
    """Rounding the mean to float32 before the noise could move it by half a float32 step per value,
    beyond the C/m the noise is calibrated to (a review); rounding after the noise is post-processing."""
    import flwr.serverapp.strategy.dp_adaptive_clipping as adaptive
    import flwr.serverapp.strategy.dp_fixed_clipping as fixed

    noised = []
    for module in (fixed, adaptive):
        real = module.add_gaussian_noise_inplace
        monkeypatch.setattr(module, "add_gaussian_noise_inplace",
                            lambda arrays, std, real=real: (noised.extend(a.dtype for a in arrays), real(arrays, std)))
    g = global_arrays()
    strategy = build_strategy(cfg_for(side=side, z=1.0, c=1.0))
    configure(strategy, g)
    arrays, _ = strategy.aggregate_train(1, [reply(g, update_of_norm(0.5, i)) for i in range(4)])
    assert noised and set(noised) == {np.dtype(np.float64)}
    assert {arrays[name].numpy().dtype for name in arrays.keys()} == {np.dtype(np.float32)}


def test_noise_has_std_z_c_over_m():
    np.random.seed(0)  # Flower draws from numpy's global generator
    g = global_arrays()
    z, c, m = 2.0, 0.5, 4
    strategy = build_strategy(cfg_for(z=z, c=c, clients=m))
    configure(strategy, g)
    # tiny updates: Flower's clipping divides by the update's norm and fails on an exact zero
    updates = [update_of_norm(1e-4, i) for i in range(m)]
    arrays, _ = strategy.aggregate_train(1, [reply(g, u) for u in updates])
    noise = delta_of(arrays, g)["head"] - sum(u["head"] for u in updates) / m
    assert abs(noise.mean()) < 4 * (z * c / m) / np.sqrt(SIZE)
    assert noise.std() == pytest.approx(z * c / m, rel=0.05)  # std of the std estimate ~ 1.1%


def test_a_round_where_nobody_trained_is_still_a_noised_release():
    np.random.seed(1)
    g = global_arrays()
    strategy = build_strategy(cfg_for(z=1.0, c=1.0))
    configure(strategy, g)
    arrays, metrics = strategy.aggregate_train(1, [])
    assert metrics is None
    assert delta_of(arrays, g)["head"].std() == pytest.approx(1.0 / 4, rel=0.05)
    assert strategy.releases == 1


def test_institutions_join_each_round_by_independent_coin_flips():
    """The client-level ε is the Poisson-subsampled Gaussian's. Flower samples exactly m of N, for which
    that is no proof (the review: 5.64 reported where the true ε is at least 12.06), so each node is
    kept by its own coin flip with q = m/N, and the cohort size varies."""
    g = global_arrays()
    strategy = build_strategy(cfg_for(z=1.0, clients=20, fraction=0.25))  # q = 5/20
    sizes, chosen = [], Counter()
    for round_ in range(1, 401):
        messages = list(strategy.configure_train(round_, record(g), ConfigRecord({}), grid(20)))
        sizes.append(len(messages))
        chosen.update(m.metadata.dst_node_id for m in messages)
    assert len(set(sizes)) > 3, "a fixed-size sample would always be 5"
    assert np.mean(sizes) == pytest.approx(5.0, abs=0.4)
    assert np.var(sizes) == pytest.approx(20 * 0.25 * 0.75, rel=0.3)  # binomial, not fixed
    assert set(chosen) == set(range(1, 21)) and all(60 <= n <= 140 for n in chosen.values())


def test_a_larger_cohort_is_still_divided_by_the_expected_m():
    """Fixed denominator (McMahan et al. 2018): one institution moves the aggregate by at most C/m."""
    g = global_arrays()
    strategy = build_strategy(cfg_for(z=0.0, c=1.0, clients=4, fraction=0.5))  # m = 2
    strategy.configure_train(1, record(g), ConfigRecord({}), grid(4))
    updates = [update_of_norm(0.5, i) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, [reply(g, u) for u in updates])
    got = delta_of(arrays, g)
    for n in g:
        np.testing.assert_allclose(got[n], sum(u[n] for u in updates) / 2, atol=2e-6)


def test_client_side_wrapper_sends_the_norm_and_trusts_the_clients_clipping():
    g = global_arrays()
    strategy = build_strategy(cfg_for(side="client", z=0.0, c=0.7))
    config = configure(strategy, g)
    assert config[k.CLIPPING_NORM] == pytest.approx(0.7)
    big = update_of_norm(5.0, 3)
    arrays, _ = strategy.aggregate_train(1, [reply(g, big)])
    np.testing.assert_allclose(delta_of(arrays, g)["head"], big["head"] / 4, atol=2e-6)  # not clipped here


def test_adaptive_accounts_the_configured_noise_multiplier_even_for_a_small_cohort():
    strategy = build_strategy(cfg_for("adaptive", z=1.0, clients=3))
    # Flower's default count noise (m/20) would refuse z = 1 with 3 clients; ours is accepted and
    # its update and count noise together are worth exactly z = 1
    assert strategy.account().noise_multiplier == pytest.approx(1.0, rel=1e-9)
    assert strategy.noise_multiplier > 1.0 and strategy.clipped_count_stddev >= 2.0


def test_adaptive_noise_is_scaled_to_the_norm_the_updates_were_clipped_to():
    np.random.seed(2)
    g = global_arrays()
    strategy = build_strategy(cfg_for("adaptive", z=1.0, c=1.0))
    strategy.clip_norm_lr = 3.0  # a big step: Flower's order would scale the noise to the new norm
    configure(strategy, g)
    updates = [update_of_norm(50.0, i) for i in range(4)]
    arrays, _ = strategy.aggregate_train(1, [reply(g, u) for u in updates])
    clipped_mean = sum(u["head"] / 50.0 for u in updates) / 4
    noise = delta_of(arrays, g)["head"] - clipped_mean
    assert noise.std() == pytest.approx(strategy.noise_multiplier * 1.0 / 4, rel=0.05)
    assert strategy.clipping_norm != pytest.approx(1.0, rel=0.05), "the norm did move, after the noise"


@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_clipped_fraction_counts_missing_updates_as_unclipped(side):
    g = global_arrays()
    strategy = build_strategy(cfg_for("adaptive", side, z=1.0, c=1.0))
    strategy.clipped_count_stddev = 0.0  # exact count, to see the denominator
    configure(strategy, g)
    bits = {KEY_NORM_BIT: 1} if side == "client" else {}
    strategy.aggregate_train(1, [reply(g, update_of_norm(9.0, i), **bits) for i in range(2)])
    # 2 clipped of m = 4 sampled is the target quantile 0.5: the norm stays (Flower's 2 of 2 would shrink it)
    assert strategy.clipping_norm == pytest.approx(1.0)


def test_ledger_entry_has_the_agreed_shape_and_resumes():
    g = global_arrays()
    strategy = build_strategy(cfg_for(z=1.1, c=0.8, clients=10, fraction=0.3))
    configure(strategy, g, nodes=10)
    strategy.aggregate_train(1, [reply(g, update_of_norm(1.0, 0))])
    entry = state_dict(strategy)["client_level"]
    assert entry == {"clipping": "fixed", "side": "server", "noise_multiplier": 1.1, "clipping_norm": 0.8,
                     "sample_rate": 0.3, "rounds": 1, "delta": 1e-5,
                     "epsilon": pytest.approx(client_level_epsilon(1.1, 0.3, 1, 1e-5)), "accountant": "rdp",
                     "sampling": "poisson"}
    fresh = build_strategy(cfg_for(z=1.1, c=0.8, clients=10, fraction=0.3))
    load_state_dict(fresh, {"client_level": {**entry, "rounds": 7}})
    assert fresh.releases == 7
    with pytest.raises(FedtuneError, match="noise_multiplier"):
        load_state_dict(build_strategy(cfg_for(z=2.0, c=0.8, clients=10, fraction=0.3)), {"client_level": entry})


def test_adaptive_resume_continues_from_the_ledgers_norm():
    strategy = build_strategy(cfg_for("adaptive", z=1.0, c=1.0))
    load_state_dict(strategy, {"client_level": {**state_dict(strategy)["client_level"], "clipping_norm": 0.25,
                                                "rounds": 3}})
    assert strategy.clipping_norm == 0.25 and state_dict(strategy)["client_level"]["clipping_norm"] == 0.25


# ---- the client mod -------------------------------------------------------------------------------------

def train_message(g: dict[str, np.ndarray], config: dict) -> Message:
    content = RecordDict({k.ARRAYS: record(g), k.CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def client_reply(msg: Message, update: dict[str, np.ndarray] | None, g: dict[str, np.ndarray]) -> Message:
    content = RecordDict({k.METRICS: MetricRecord({k.NUM_EXAMPLES: 5}),
                          k.CLIENT_INFO: ConfigRecord({k.STATUS: k.STATUS_TRAINED})})
    if update is not None:
        content[k.ARRAYS] = record({n: g[n] + update[n] for n in g})
    return Message(content, reply_to=msg)


def test_flowers_keys_are_ours():
    assert (k.CLIPPING_NORM, k.NORM_BIT) == (KEY_CLIPPING_NORM, KEY_NORM_BIT)
    assert k.CLIENT_DP in FedtuneConfig().to_flat()


def test_mod_is_a_no_op_when_the_server_did_not_ask_to_clip():
    g = global_arrays()
    msg = train_message(g, {"dp.client_dp": "fixed"})  # client-level DP on the server side: no norm sent
    out = client_reply(msg, update_of_norm(5.0, 1), g)
    assert client_clipping_mod(msg, context(), lambda m, c: out) is out


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_mod_clips_the_update_when_asked(clipping):
    g = global_arrays()
    msg = train_message(g, {k.CLIPPING_NORM: 0.5, k.CLIENT_DP: clipping})
    big = update_of_norm(5.0, 4)
    out = client_clipping_mod(msg, context(), lambda m, c: client_reply(m, big, g))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    got = delta_of(out.content[k.ARRAYS], g)
    for n in g:
        np.testing.assert_allclose(got[n], big[n] / 10.0, atol=2e-6)
    assert list(out.content[k.ARRAYS].keys()) == list(g)
    assert (k.NORM_BIT in out.content[k.METRICS]) == (clipping == "adaptive")
    if clipping == "adaptive":
        assert out.content[k.METRICS][k.NORM_BIT] == 1


@pytest.mark.parametrize("secagg", [False, True])
def test_the_update_the_server_sums_stays_within_the_clipping_norm_after_rounding(secagg):
    """A review measured 1.00008·C (worst case 1.02·C) for updates clipped to C, then rounded by SecAgg+:
    the noise is calibrated to C. The mod now clips inside C by the most rounding can add: the update as
    summed (float32 weights, then SecAgg+'s stochastic quantization and its inverse) has norm at most C."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(5)
    g = {"lora_A": rng.normal(size=(40, 50)).astype(np.float32), "head": rng.normal(size=(3000,)).astype(np.float32)}
    norm = 0.002  # small against d = 5,000 values, where the rounding is a large part of C
    config = {k.CLIPPING_NORM: norm, k.CLIENT_DP: "fixed", **({k.SECAGG: True} if secagg else {})}
    for _ in range(5):
        msg = train_message(g, dict(config))
        update = {n: rng.normal(size=a.shape) * 0.01 for n, a in g.items()}
        out = client_clipping_mod(msg, context(), lambda m, c, u=update: client_reply(m, u, g))
        sent = [out.content[k.ARRAYS][n].numpy() for n in g]
        if secagg:
            codes = quantize(sent, k.SECAGG_CLIPPING_RANGE, k.SECAGG_QUANTIZATION_RANGE)
            sent = dequantize(codes, k.SECAGG_CLIPPING_RANGE, k.SECAGG_QUANTIZATION_RANGE)
        deltas = [np.asarray(x, dtype=np.float64) - g[n] for x, n in zip(sent, g, strict=True)]
        summed = np.sqrt(sum((delta ** 2).sum() for delta in deltas))
        assert norm * 0.8 < summed <= norm, f"{summed / norm:.5f}·C"


def test_a_rounding_margin_that_eats_into_the_clipping_norm_is_warned_about():
    g = global_arrays()
    msg = train_message(g, {k.CLIPPING_NORM: 1e-4, k.CLIENT_DP: "fixed", k.SECAGG: True})
    with pytest.warns(UserWarning, match=r"rounding of 4,006 values \(SecAgg\+'s, float32's\) takes"):
        client_clipping_mod(msg, context(), lambda m, c: client_reply(m, update_of_norm(1.0, 2), g))


def test_mod_passes_a_declined_reply_through():
    g = global_arrays()
    msg = train_message(g, {k.CLIPPING_NORM: 0.5, k.CLIENT_DP: "fixed"})
    declined = client_reply(msg, None, g)
    out = client_clipping_mod(msg, context(), lambda m, c: declined)
    assert out is declined and not out.has_error()


def test_the_client_level_state_is_found_under_any_outer_wrapper():
    """The round loop asks the whole stack once (strategies/wrapper.py); an outer wrapper (say a
    LoRA-aware one) must not hide the client-level layer, or its releases would go unrecorded."""
    from fedtune.strategies.wrapper import StrategyWrapper

    g = global_arrays()
    inner = build_strategy(cfg_for(z=1.1, c=0.8, clients=10, fraction=0.3))
    outer = StrategyWrapper(inner)
    configure(outer, g, nodes=10)
    outer.aggregate_train(1, [reply(g, update_of_norm(1.0, 0))])
    assert state_dict(outer)["client_level"]["rounds"] == 1
    load_state_dict(outer, {"client_level": {**state_dict(outer)["client_level"], "rounds": 4}})
    assert inner.releases == 4
