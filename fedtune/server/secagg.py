"""The train exchange of a round through Flower's SecAgg+ (secure aggregation).

Flower 1.42 ships SecAgg+ only for its legacy API: `SecAggPlusWorkflow` drives a legacy
Strategy's configure_fit / aggregate_fit through a `LegacyContext`, and the clients'
`secaggplus_mod` masks a legacy FitRes. fedtune keeps that legacy surface inside this module and
client/secagg.py: `secure_exchange` takes the Message-API messages that strategy.configure_train
made (its sampling, its config, the client-level DP norm), runs the four SecAgg+ stages over
exactly those nodes, and hands the round loop ordinary replies, so everything after it (ledger,
aggregate_train, DP wrappers) is unchanged.

What the server learns: the sum of the updated adapters (every client submits with weight 1,
so the mean is per institution, not per example) and each client's metrics and status, which
travel in plaintext (the ledger needs them). A client that declines (ε budget) takes part with
a zero update, so the protocol never depends on who trained. The replies handed on carry, for
each client that trained, the mean of the updates of those that trained: any strategy that
averages its replies (FedAvg; ZeroFilledMean under client-level DP) then computes the same
aggregate it would from the individual updates, and none of those is ever seen.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from rich.progress import Progress

from fedtune import constants as k
from fedtune.privacy import distributed
from fedtune.server.validate import MAX_COUNT, WEIGHT_CAP

# Every sampled institution shares its keys with every other (SecAgg+ over the complete graph:
# cross-silo federations are small, and this gives the highest collusion threshold); the
# server needs shares from 2/3 of them to remove the masks, so it tolerates a third dropping out.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
# Adapter parameters are quantized in [-CLIPPING_RANGE, CLIPPING_RANGE] (2^22 levels); a client
# refuses to submit values outside it rather than let them be clipped silently (client/secagg.py).
CLIPPING_RANGE = k.SECAGG_CLIPPING_RANGE


def usable_records(counts: list[object]) -> float:
    """Σ n_i over the institutions whose shares trained, each count as the server can use it. The counts are
    plaintext beside the masked sum, and an institution states its own: a whole number in [1, MAX_COUNT],
    at most WEIGHT_CAP × the round's lower median (bounded_weights' rule); a missing or malformed one (its
    reply is rejected afterwards, its share already in the sum) counts as that median. So no count can make
    the step NaN (0 or a negative total) or shrink it without bound."""
    read = [_count(n) for n in counts]
    valid = [n for n in read if n is not None]
    median = statistics.median_low(valid) if valid else 1.0
    return sum(median if n is None else min(n, WEIGHT_CAP * median) for n in read)


def _count(value: object) -> float | None:
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
          and float(value).is_integer() and 1 <= value <= MAX_COUNT)
    return float(value) if ok else None


def secure_exchange(grid: Grid, messages: Iterable[Message], label: str, progress: Progress,
                    timeout_s: float | None) -> list[Message]:
    """Like server/rounds.py's `exchange` for train messages (distinct nodes, the same arrays),
    with the updates summed by SecAgg+; sampled nodes that did not finish it get error replies."""
    messages = list(messages)
    if not messages:
        return []
    content = messages[0].content
    arrays: ArrayRecord = content[k.ARRAYS]
    round_ = int(content[k.CONFIG][k.SERVER_ROUND])
    task = progress.add_task(f"{label} (SecAgg+)", total=None, eps="")
    relay = _Relay(messages, arrays, grid)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=round_), strategy=relay,
                            client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    if relay.distributed:  # distributed DP: the clients' shares lie on an exact grid (privacy/distributed.py)
        SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=1.0,
                           clipping_range=distributed.CLIPPING_RANGE,
                           quantization_range=distributed.quantization_range(len(messages)),
                           modulus_range=2**distributed.MODULUS_BITS, timeout=timeout_s)(grid, context)
    else:
        SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=1.0, clipping_range=CLIPPING_RANGE,
                           quantization_range=k.SECAGG_QUANTIZATION_RANGE, timeout=timeout_s)(grid, context)
    progress.remove_task(task)
    replies = relay.replies()
    if relay.range_used >= distributed.RANGE_WARNING:
        progress.console.print(
            f"round {round_}: the distributed-DP sum used {relay.range_used:.0%} of SecAgg+'s range; past it the "
            "sum wraps around and the round's update is wrong. A lower train.sample_rate (fewer records in a "
            "step) or fewer institutions per round (a wider range) keeps it inside.", markup=False, highlight=False)
    return replies


class _Relay(LegacyStrategy):
    """The legacy Strategy that SecAggPlusWorkflow drives: it samples nothing itself (the nodes
    and config come from our strategy's messages) and keeps the securely summed result."""

    def __init__(self, messages: list[Message], arrays: ArrayRecord, grid: Grid) -> None:
        self.messages = {m.metadata.dst_node_id: m for m in messages}
        self.names = list(arrays.keys())
        self.global_arrays = arrays
        # Each node's own config: it carries the ledger's record of that client's spending alone.
        self.configs = {node: {**m.content[k.CONFIG], k.ARRAY_NAMES: self.names} for node, m in self.messages.items()}
        self.grid = grid
        self.results: list[tuple[int, FitRes]] = []
        self.mean: list[np.ndarray] | None = None
        self.failure_reasons: list[str] = []
        config = next(iter(self.messages.values())).content[k.CONFIG]
        self.distributed = int(config.get("dp.distributed_min_honest", 0)) > 0
        self.round = int(config[k.SERVER_ROUND])
        # distributed DP: what turns the shares' integer sum into the round's update (the config sent)
        self.learning_rate = float(config.get(k.LEARNING_RATE, config.get("train.learning_rate", 0.0)))
        self.sample_rate = float(config.get("train.sample_rate", 0.0))
        self.max_grad_norm = float(config.get("dp.max_grad_norm", 1.0))
        self.range_used = 0.0  # distributed DP: the decoded sum's largest |Σ K| as a share of Q/2

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return [(GridClientProxy(node, self.grid, 0), FitIns(parameters, self.configs[node])) for node in self.messages]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        # SecAggPlusWorkflow has put the unmasked mean over all submitting clients into every FitRes
        self.results = [(proxy.node_id, fit_res) for proxy, fit_res in results]
        # the workflow keeps the clients' errors without their node ids: name them all
        self.failure_reasons = sorted({str(getattr(f.args[0], "reason", f)) if f.args else str(f) for f in failures})
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def replies(self) -> list[Message]:
        """Ordinary train replies: per finished client, its plaintext metrics and status, and (if it
        trained) the mean update of the clients that trained; error replies for the others."""
        infos = {node: _split_metrics(fit_res.metrics) for node, fit_res in self.results}
        trained = [node for node, (info, _) in infos.items() if info.get(k.STATUS) == k.STATUS_TRAINED]
        if not trained:
            mean_of_trained = None
        elif self.distributed:
            records = usable_records([infos[node][1].get(k.NUM_EXAMPLES) for node in trained])
            mean_of_trained = self._distributed_step(list(infos), records)
        else:
            mean_of_trained = self._mean_of_trained(len(infos), len(trained))
        out = []
        for node, msg in self.messages.items():
            if node not in infos:
                errors = f"; errors this round: {'; '.join(self.failure_reasons)}" if self.failure_reasons else ""
                out.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                         f"did not complete secure aggregation (dropped out or failed){errors}"),
                                   reply_to=msg))
                continue
            info, metrics = infos[node]
            reply = RecordDict({k.METRICS: metrics, k.CLIENT_INFO: info})
            if node in trained:
                reply[k.ARRAYS] = mean_of_trained
            out.append(Message(reply, reply_to=msg))
        return out

    def _mean_of_trained(self, submitted: int, trained: int) -> ArrayRecord:
        # mean over all submitters = g + (sum of the trained updates) / submitted; declined sent g
        base = self.global_arrays.to_numpy_ndarrays()
        return ArrayRecord({name: Array(np.asarray(g + (a - g) * (submitted / trained), dtype=g.dtype))
                            for name, g, a in zip(self.names, base, self.mean, strict=True)})

    def _distributed_step(self, submitters: list[int], records: int) -> ArrayRecord:
        """Distributed DP: θ + Σ_i n_i·Δ_i / Σ n_i over the institutions that trained (FedAvg), where Σ n_i·Δ_i
        is the decoded integer sum of every submitter's share times the step's scale (privacy/distributed.py)."""
        base = self.global_arrays.to_numpy_ndarrays()
        q = distributed.quantization_range(len(self.messages))
        scale = distributed.step_scale(self.learning_rate, self.sample_rate, self.max_grad_norm)
        sums = [distributed.decode_sum(mean, len(submitters), q) for mean in self.mean]
        self.range_used = distributed.range_used(sums, q)
        totals = [total * scale for total in sums]
        return ArrayRecord({name: Array(np.asarray(g + total / records, dtype=g.dtype))
                            for name, g, total in zip(self.names, base, totals, strict=True)})

    # The evaluate half and the legacy extras are not used: fedtune evaluates in its own loop.
    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def _split_metrics(metrics: dict[str, Any]) -> tuple[ConfigRecord, MetricRecord]:
    """A FitRes's metrics back into our CLIENT_INFO (strings) and METRICS (numbers) records. Anything
    else is dropped; server/validate.py then names what a malformed reply lacks."""
    prefix = k.SECAGG_INFO_PREFIX
    info = ConfigRecord({key[len(prefix):]: str(v) for key, v in metrics.items() if key.startswith(prefix)})
    numbers = MetricRecord({key: v for key, v in metrics.items() if not key.startswith(prefix)
                            and isinstance(v, int | float) and not isinstance(v, bool)})
    return info, numbers

