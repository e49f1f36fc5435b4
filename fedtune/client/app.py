"""The ClientApp: one institution's side of every round.

The server sends the run's recipe (the flat config) with each message; the institution's
own facts (its data file or partition, its privacy policy, where it keeps its state) come from
Flower's node config. Before training, a client checks the request against its privacy policy
(privacy/policy.py) and its remembered spending against the server's ledger record of it
(client/state.py), and replies `refused` with the reason when either does not hold. The same
ClientApp serves `fedtune simulate` and `flwr run`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import constants as k
from fedtune.client.data import gradient_canaries, local_data
from fedtune.client.mods import client_clipping_mod
from fedtune.client.secagg import secagg_mod, secagg_range
from fedtune.client.state import (
    ClientState,
    DamagedState,
    adopt_ledger_spending,
    known_history,
    load_state,
    lost_spending,
    rounds_on_ledger,
    save_state,
    settle_unit,
    spent,
    spent_on_ledger,
    state_lock,
    unit_conflict,
    unrecorded,
)
from fedtune.client.train import lora_weights, moved, train_round
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.models.adapter import load_record, to_record
from fedtune.models.lora_factors import ranks, truncate
from fedtune.privacy.accountant import History, epsilon, other
from fedtune.privacy.budget import client_dp, poisson_schedule, projected_epsilon, share_dp, within_budget
from fedtune.privacy.distributed import not_one_sgd_step
from fedtune.privacy.dpsgd import round_seed
from fedtune.privacy.ledger import LedgerEntry
from fedtune.privacy.policy import PrivacyPolicy, node_policy
from fedtune.resources import peak_rss_mb
from fedtune.tasks.base import Scores, get_task

app = ClientApp()
SENT_KEYS = frozenset(FedtuneConfig().client_flat())  # the run-config keys among a message's config


def recipe(message: Message) -> tuple[FedtuneConfig, ConfigRecord]:
    """The run config the server sent (FedtuneConfig.client_flat), and the full incoming ConfigRecord."""
    record = message.content[k.CONFIG]
    sent = tuple(sorted((key, tuple(value) if isinstance(value, list) else value)
                        for key, value in record.items() if key in SENT_KEYS))
    return _parsed(sent), record


@lru_cache(maxsize=64)
def _parsed(sent: tuple[tuple[str, Any], ...]) -> FedtuneConfig:
    """Parsed and validated once per worker and distinct recipe, not on every message."""
    return FedtuneConfig.from_flat({key: list(value) if isinstance(value, tuple) else value for key, value in sent},
                                   source="server message")


def client_name(context: Context) -> str:
    node = context.node_config
    if k.NODE_CLIENT_NAME in node:
        return str(node[k.NODE_CLIENT_NAME])
    if k.PARTITION_ID in node:
        return f"client-{int(node[k.PARTITION_ID]):04d}"
    return f"node-{context.node_id}"  # deployment with data-path: no partition id


def own_rank(cfg: FedtuneConfig, context: Context) -> int:
    """The LoRA rank this institution trains: its node config `lora-rank` (deployment), else
    lora.client_ranks[partition id % len] (simulation), else lora.r. A node's own rank in a run
    without lora.client_ranks is refused: the server would reject every update of another rank."""
    node, mixed = context.node_config, cfg.lora.ranks()
    if k.NODE_LORA_RANK in node:
        own = node[k.NODE_LORA_RANK]
        if isinstance(own, bool) or not isinstance(own, int) or not 1 <= own <= cfg.lora.r:
            raise ConfigError(f"Invalid node config `{k.NODE_LORA_RANK}`: {own!r}; use a rank from 1 to "
                              f"lora.r = {cfg.lora.r}, the rank of the global adapter.")
        if not mixed:
            raise ConfigError(f"Node config `{k.NODE_LORA_RANK}` = {own}, but this run trains every client at "
                              f"lora.r = {cfg.lora.r}. Remove it from the node config, or run with lora.client_ranks "
                              "set (which lets each node train its own rank).")
        return own
    if mixed and k.PARTITION_ID in node:
        return mixed[int(node[k.PARTITION_ID]) % len(mixed)]
    return cfg.lora.r


def _cached_model(cfg: FedtuneConfig, rank: int):
    """The worker's model with a LoRA adapter of `rank` (built once per process, models/build.py)."""
    threads_as_assigned()
    lora = cfg.lora if rank == cfg.lora.r else dataclasses.replace(cfg.lora, r=rank, client_ranks="")
    return get_task(cfg.model.task).build_model(cfg.model, lora, cfg.data, cfg.seed)


def threads_as_assigned() -> None:
    """Run torch on as many threads as OMP_NUM_THREADS says, where set. Ray sets it to a worker's
    assigned CPUs only when the worker's actor starts; a worker that imported torch before that (the
    local Ray preloads this module, simulation/engine.py) has already sized torch's pool to the
    machine, and two such workers on two cores would each run two threads."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        if torch.get_num_threads() != int(threads):  # once per process: _cached_model runs every round
            torch.set_num_threads(int(threads))


def _model(cfg: FedtuneConfig, arrays: ArrayRecord, context: Context):
    """The (cached) model at this client's rank holding `arrays`. The server sends its rank, or the
    global rank before it has heard from the client; a higher rank is viewed at the client's own
    exactly as the server would (models/lora_factors.py), and a lower one is trained as sent."""
    sent = ranks((name, tuple(array.shape)) for name, array in arrays.items())
    rank = min(own_rank(cfg, context), *sent)
    model = _cached_model(cfg, rank)
    if sent and max(sent) > rank:
        view = truncate({name: array.numpy() for name, array in arrays.items()}, rank)
        arrays = ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in view.items()})
    load_record(model, arrays)
    return model


@app.train(mods=[secagg_mod, client_clipping_mod])  # each a no-op unless the server asks for it
def train(msg: Message, context: Context) -> Message:
    cfg, record = recipe(msg)
    policy = node_policy(context.node_config, cfg, str(record.get(k.CLIENT_STATE_DIR, "")))
    cfg = dataclasses.replace(cfg, dp=policy.tighten(cfg.dp, cfg.rounds_per_client(), cfg.train.sample_rate))
    name = client_name(context)
    with state_lock(policy.state_dir, name):  # load, train, save: one at a time per institution
        return _train(msg, context, cfg, record, name, policy)


def _train(msg: Message, context: Context, cfg: FedtuneConfig, record: ConfigRecord, name: str,
           policy: PrivacyPolicy) -> Message:
    train_data, _ = local_data(cfg, context)
    n, server_round = len(train_data), int(record[k.SERVER_ROUND])
    try:
        state = load_state(context, name, policy.state_dir)
    except DamagedState as err:  # refused, and the file is left as it is: never overwritten with less
        known = spent_on_ledger(record)
        # The round's rate and the σ every institution solves for (one step a round at the run's q under
        # distributed DP, so the same σ whatever its history): its noise-only share must be as large as any.
        cfg = _round_config(cfg, record, ClientState(), n)
        metrics = _report(cfg, known, n, float("nan"), steps=0, sample_rate=0.0, bytes_up=0)
        return _Round(msg, context, cfg, name, policy, server_round, n).reply(k.STATUS_REFUSED, metrics,
                                                                                reason=str(err))
    cfg = _round_config(cfg, record, state, n)
    ledger, run, held = spent_on_ledger(record), record.get(k.RUN_ID), rounds_on_ledger(record)
    settle_unit(state, run)
    lost = lost_spending(state, ledger, run, held)
    if lost and policy.adopt_ledger_spending:  # the operator's explicit reset: continue from the ledger
        adopt_ledger_spending(state, ledger, run, held)
        state.record_level = state.record_level or (cfg.dp.enabled and cfg.dp.unit == "record")  # the ledger's unit
        state.user_level = state.user_level or (cfg.dp.enabled and cfg.dp.unit == "user")
        lost = None
        round_ = _Round(msg, context, cfg, name, policy, server_round, n, {k.ADOPTED_LEDGER_SPENDING: 1})
    else:
        round_ = _Round(msg, context, cfg, name, policy, server_round, n)
    late = unrecorded(state, ledger, held, run)  # this run's, never recorded
    if late:
        round_ = dataclasses.replace(round_, late=tuple(late))
    refusal = (policy.refusal(cfg.dp, n) or (cfg.dp.enabled and unit_conflict(state, cfg.dp.unit))
               or (lost and f"{lost}. To continue from the ledger's record, set "
                            f"`{k.NODE_ADOPT_LEDGER_SPENDING} = true` in the node config"))
    if refusal:  # its ε is reported from the fuller record, so the ledger never shows it lower
        return round_.without_training(state, k.STATUS_REFUSED, known_history(state, ledger, run, held), refusal)
    plan = cfg.train  # the round's schedule
    if cfg.dp.enabled and not within_budget(cfg.dp, state.history, n, plan.batch_size, plan.local_epochs,
                                            plan.sample_rate):
        after = projected_epsilon(cfg.dp, state.history, n, plan.batch_size, plan.local_epochs, plan.sample_rate)
        return round_.without_training(state, k.STATUS_DECLINED, state.history, (
            f"one more round would take its ε to {after:.2f}, above its budget of {cfg.dp.epsilon_budget:g} "
            "(dp.epsilon_budget, capped by dp.target_epsilon)"))
    if cfg.dp.distributed_min_honest and (problem := not_one_sgd_step(cfg.train, n)):
        return round_.without_training(state, k.STATUS_REFUSED, state.history, (
            f"distributed DP sums one plain-SGD step of each institution, but {problem}"))
    # (a train.sample_rate below 1 is refused with dp.public_streams when the config is read)
    if cfg.dp.public_streams and poisson_schedule(n, plan.batch_size, 1, plan.sample_rate)[0] != 1.0:
        return round_.without_training(state, k.STATUS_REFUSED, state.history, (
            f"dp.public_streams lets the server know which records each step samples, which DP-SGD's sampling "
            f"amplification needs secret; it needs every record in every step, but {n} records at "
            f"train.batch_size {plan.batch_size} take several; raise it to at least {n}"))
    model = _model(cfg, msg.content[k.ARRAYS], context)
    before = lora_weights(model)
    result = train_round(model, train_data, cfg, state.history, float(record.get(k.PROXIMAL_MU, 0.0)),
                         _round_seed(cfg, server_round, name), gradient_canaries(cfg, context))
    spent(state, result.history, cfg.dp.unit if cfg.dp.enabled else None)  # spent, whatever happens next
    arrays = to_record(model)
    loss = math.nan if policy.withholds_scores(cfg.dp) else result.loss
    metrics = _report(cfg, result.history, n, loss, result.steps, result.sample_rate, arrays.count_bytes())
    if cfg.dp.distributed_min_honest:  # its integer share of the sum, not its adapter (privacy/distributed.py)
        arrays = _share(msg.content[k.ARRAYS], result.share, secagg_range(context))
    if not moved(before, model):  # fail closed (Opacus #820): an update no optimizer step reached
        return round_.finish(state, k.STATUS_FAILED, metrics, reason=NOT_MOVED)
    stated = {k.LORA_RANK: own_rank(cfg, context)} if cfg.lora.ranks() else {}  # the rank to send it next
    return round_.finish(state, k.STATUS_TRAINED, metrics, arrays=arrays, info=stated)


NOT_MOVED = ("no LoRA weight changed in local training (the optimizer did not reach them; Opacus issue #820), so "
             "the update is not sent; the DP-SGD steps were taken and count")


def _round_config(cfg: FedtuneConfig, record: ConfigRecord, state: ClientState, n: int) -> FedtuneConfig:
    """The run config as this round trains it: the round's learning rate (train.lr_schedule) and,
    under a target ε, the σ this client solved for (kept in its state from its first round of the run on).
    Under distributed DP σ is the run's, solved afresh every round from the run's target ε, δ, q (1,
    or train.sample_rate) and rounds for one step a round (share_dp), never from the state (which may
    hold another run's) nor from this institution's own records: every institution's share, a refused
    one's noise-only share too, must be of the same σ."""
    if k.LEARNING_RATE in record:
        rate = float(record[k.LEARNING_RATE])
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=rate))
    if cfg.dp.enabled and any(e.accountant == "skellam" and e.steps for e in state.ledger):
        # its history holds integer shares (an earlier distributed-DP run): only `skellam` covers those steps
        cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, accountant="skellam"))
    if cfg.dp.enabled:
        if cfg.dp.distributed_min_honest:
            dp = share_dp(cfg.dp, cfg.rounds_per_client(), cfg.train.sample_rate)
        else:
            run = str(record.get(k.RUN_ID, ""))  # a σ solved in another run (another target, another n) is not kept
            solved = state.noise_multiplier if state.solved_in == run else None
            dp = client_dp(cfg.dp, solved, n, cfg.train.batch_size, cfg.train.local_epochs,
                           cfg.rounds_per_client(), cfg.train.sample_rate)
            if dp.target_epsilon > 0:
                state.noise_multiplier, state.solved_in = dp.noise_multiplier, run
        cfg = dataclasses.replace(cfg, dp=dp)
    return cfg


@dataclass(frozen=True)
class _Round:
    """What a round's reply needs besides its outcome: it records the outcome in the client's own
    ledger and state (durably, before replying) and builds the reply."""

    msg: Message
    context: Context
    cfg: FedtuneConfig
    name: str
    policy: PrivacyPolicy
    server_round: int
    num_examples: int
    notes: dict[str, int] = dataclasses.field(default_factory=dict)  # also in its ledger entry
    late: tuple[LedgerEntry, ...] = ()  # its own entries for spending the server has not recorded

    def without_training(self, state: ClientState, status: str, history: History, reason: str = "") -> Message:
        metrics = _report(self.cfg, history, self.num_examples, float("nan"), steps=0, sample_rate=0.0, bytes_up=0)
        return self.finish(state, status, metrics, reason=reason)

    def finish(self, state: ClientState, status: str, metrics: MetricRecord, arrays: ArrayRecord | None = None,
               reason: str = "", info: dict[str, int] | None = None) -> Message:
        state.ledger.append(LedgerEntry.from_report(
            self.server_round, status, metrics, self.cfg.dp.accounting, reason=reason,
            adopted_ledger_spending=bool(self.notes.get(k.ADOPTED_LEDGER_SPENDING)),
            run=self.msg.content.config_records.get(k.CONFIG, ConfigRecord()).get(k.RUN_ID)))
        save_state(self.context, self.name, self.policy.state_dir, state)
        return self.reply(status, metrics, arrays, reason, info)

    def reply(self, status: str, metrics: MetricRecord, arrays: ArrayRecord | None = None, reason: str = "",
              info: dict[str, int] | None = None) -> Message:
        """The reply alone, with nothing recorded (finish records first)."""
        client = {k.CLIENT_NAME: self.name, k.STATUS: status, k.POLICY: self.policy.source,
                  **({k.REASON: reason} if reason else {}), **self.notes, **(info or {}),
                  **({k.UNRECORDED: json.dumps([e.to_dict() for e in self.late])} if self.late else {}),
                  **ray_node()}
        content = RecordDict({k.METRICS: metrics, k.CLIENT_INFO: ConfigRecord(client)})
        if arrays is None and self.cfg.dp.distributed_min_honest:  # every submitter adds its noise share
            arrays = _noise_share(self.msg.content[k.ARRAYS], self.cfg, secagg_range(self.context))
        if arrays is not None:
            content[k.ARRAYS] = arrays
        return Message(content, reply_to=self.msg)


def _share(start: ArrayRecord, share: dict[str, np.ndarray], q: int) -> ArrayRecord:
    from fedtune.privacy.distributed import encode

    return ArrayRecord({name: Array(encode(share[name], q)) for name in start.keys()})


def _noise_share(start: ArrayRecord, cfg: FedtuneConfig, q: int) -> ArrayRecord:
    from fedtune.privacy.distributed import encode, noise_only_share, share_variance

    names = list(start.keys())
    shapes = [tuple(start[name].shape) for name in names]
    variance = share_variance(cfg.dp.noise_multiplier, shapes, cfg.dp.distributed_min_honest)
    shares = noise_only_share(shapes, variance)
    return ArrayRecord({name: Array(encode(share, q)) for name, share in zip(names, shares, strict=True)})


def ray_node() -> dict[str, str]:
    """{RAY_NODE: "IP/node id"} in a Simulation Engine worker (the run summary counts the clients each
    node ran); empty elsewhere, e.g. a deployed SuperNode, which never imports Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {k.RAY_NODE: f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:12]}"}


def _round_seed(cfg: FedtuneConfig, server_round: int, name: str) -> int | None:
    """Seed for this round's Poisson sampling, dropout and DP noise (each derived from it
    separately, privacy/dpsgd.py). Under DP, None: each drawn from the OS's secure randomness,
    unless the run asks for reproducible noise, which the server can regenerate from the run seed,
    or for public streams (the sampling's derived from it, the rest secret; RoundSeeds.of_round)."""
    if cfg.dp.enabled and not (cfg.dp.reproducible_noise or cfg.dp.public_streams):
        return None
    return round_seed(cfg.seed, server_round, name)


def _report(cfg: FedtuneConfig, history: History, num_examples: int, loss: float, steps: int, sample_rate: float,
            bytes_up: int) -> MetricRecord:
    """What a client tells the server each round: training summary and its privacy spend so far."""
    dp = cfg.dp
    return MetricRecord({
        k.NUM_EXAMPLES: num_examples,
        k.TRAIN_LOSS: loss,
        k.STEPS: steps,
        k.SAMPLE_RATE: sample_rate,
        k.NOISE_MULTIPLIER: dp.noise_multiplier if dp.enabled else 0.0,
        **({k.DISTRIBUTED_MIN_HONEST: dp.distributed_min_honest} if dp.enabled and dp.distributed_min_honest else {}),
        k.MAX_GRAD_NORM: dp.max_grad_norm if dp.enabled else 0.0,
        k.DELTA: dp.delta,
        # From the whole history: infinite once any round trained without noise (sigma = 0 in it).
        k.EPSILON: epsilon(dp.accounting, history, dp.delta),
        k.EPSILON_OTHER: epsilon(other(dp.accounting), history, dp.delta),
        k.BYTES_UP: bytes_up,
        k.PEAK_RSS_MB: peak_rss_mb(),
        k.PID: os.getpid(),
    })


@app.query(k.WARM_UP.split(".", 1)[1])
def warm_up(msg: Message, context: Context) -> Message:
    """Load what every client of this worker process shares (the imports, the base model with its
    adapter, the tokenizer and the data split), so round 1 trains from the first client on."""
    cfg, _ = recipe(msg)
    _cached_model(cfg, own_rank(cfg, context))  # the rank this node trains, as round 1's _model builds it
    local_data(cfg, context)
    return Message(RecordDict(), reply_to=msg)  # the reply only says this worker is ready


@app.query(k.IDENTIFY.split(".", 1)[1])
def identify(msg: Message, context: Context) -> Message:
    """Say which client this node is, so the server can send it the ledger's record of its
    spending (server/spending.py). Only the name: the server knows nothing else from it."""
    return Message(RecordDict({k.CLIENT_INFO: ConfigRecord({k.CLIENT_NAME: client_name(context)})}), reply_to=msg)


@app.query(k.UNRECORDED_SPENDING.split(".", 1)[1])
def report_unrecorded(msg: Message, context: Context) -> Message:
    """Without training: this client's own entries for spending the server's ledger lacks (the
    `unrecorded` that a train reply carries), asked for after the run's last round when the server
    never got this client's last reply (server/spending.py). Nothing is reported from a state that
    cannot be read; the client's next train message refuses it (DamagedState)."""
    cfg, record = recipe(msg)
    policy = node_policy(context.node_config, cfg, str(record.get(k.CLIENT_STATE_DIR, "")))
    name = client_name(context)
    try:
        with state_lock(policy.state_dir, name):
            state = load_state(context, name, policy.state_dir)
    except DamagedState:
        state = ClientState()
    late = unrecorded(state, spent_on_ledger(record), rounds_on_ledger(record), record.get(k.RUN_ID))
    info = {k.CLIENT_NAME: name, **({k.UNRECORDED: json.dumps([e.to_dict() for e in late])} if late else {})}
    return Message(RecordDict({k.CLIENT_INFO: ConfigRecord(info)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, record = recipe(msg)
    _, val_data = local_data(cfg, context)
    if node_policy(context.node_config, cfg, str(record.get(k.CLIENT_STATE_DIR, ""))).withholds_scores(cfg.dp):
        scores = Scores(math.nan, math.nan)  # noise-free figures of its records, outside ε: not sent
    elif len(val_data):
        model = _model(cfg, msg.content[k.ARRAYS], context)  # the global adapter at this client's rank
        scores = get_task(cfg.model.task).evaluate(model, val_data)
    else:  # no validation records (each record's side is its own coin, so a small client may keep none): no scores
        scores = Scores(math.nan, math.nan)
    metrics = MetricRecord({k.NUM_EXAMPLES: len(val_data), k.EVAL_LOSS: scores.loss,
                            k.EVAL_ACCURACY: scores.accuracy})
    return Message(RecordDict({k.METRICS: metrics}), reply_to=msg)
