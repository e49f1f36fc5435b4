"""LoRA-aware aggregation and heterogeneous client ranks, as wrappers around the strategy that
samples, configures and averages (FedAvg, FedProx, or under heterogeneous ranks any of the family).

    ExactLora          replaces the mean of the LoRA factors by the mean of their products
      RankAwareLora    sends each node the global adapter at its rank; lifts replies to the global rank
        inner strategy sampling, configs, evaluation, the mean of everything else, metrics

Averaging A and B separately (`naive`, FedAvg as it is) is not averaging the updates (alpha/r)·B·A
the clients learned: mean(B)·mean(A) has cross terms B_i·A_j that no client trained.
- `exact`: the example-weighted mean of the products, factored back to the global rank R by a
  truncated SVD (`average_products`). Lossless exactly when the mean has rank <= R, which is
  guaranteed when the ranks sent back add up to at most R (one client at full rank, or e.g. two at
  R/2; under mixed ranks the R - ρ components a client of rank ρ was not sent count too); otherwise
  the best rank-R approximation (Eckart-Young) drops the components past R, an error of
  sqrt(sum of the dropped squared singular values) in Frobenius norm. FedEx-LoRA would add that
  residual to the frozen base weights instead; that changes the base model on every client, which
  then needs more than adapter-sized traffic (or the whole residual history) to stay in sync.
- `ffa`: A is frozen at a value every process derives from the seed (models/lora_factors.py) and
  never travels; averaging B is then exactly averaging B·A, so at one rank no wrapper is needed.
- Heterogeneous ranks: a node of rank ρ < R gets the global's first ρ components (`truncate`) and
  returns rank-ρ factors; they are read back at rank R with the components it was not sent left as
  they were (`lift`: its update zero-padded, HetLoRA-style), then the inner strategy averages.
  With `exact` the products are averaged instead, the unsent components counting the same way.

The server learns each node's rank from its replies (the client states it, k.LORA_RANK); a node it
has not heard from yet gets the global rank and trains at its own, lower one (the client truncates
the same way). server/validate.py accepts a reply at any one rank up to the rank the node was sent.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import constants as k
from fedtune.config import FedtuneConfig
from fedtune.models.lora_factors import LORA_A, LORA_B, lift, payload_rank, truncate
from fedtune.strategies.wrapper import StrategyWrapper

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Factored:
    b: np.ndarray  # (out, rank)
    a: np.ndarray  # (rank, in), orthonormal rows
    singular_values: np.ndarray  # all of the sum's, descending; those past `rank` were dropped

    def truncation_error(self, rank: int) -> float:
        """Frobenius norm of what factoring to `rank` lost."""
        return float(np.sqrt(np.sum(self.singular_values[rank:] ** 2)))


def average_products(terms: Sequence[tuple[np.ndarray, np.ndarray, float]], scale: float, rank: int) -> Factored:
    """B, A with scale·B·A the best rank-`rank` approximation of sum(c·B_t·A_t) over terms (B_t, A_t, c).

    The singular values go into B and A keeps orthonormal rows (A = Vᵀ, B = U·S/scale) rather than
    the balanced split √S into each: a component whose singular value is 0 (the mean has rank below
    R, e.g. when fewer clients trained than the rank needs) then starts the next round as PEFT starts
    every LoRA, B's column zero and A's row a unit vector, and trains; balanced, both would be zero
    and never get a gradient again. A's unit rows are also about the scale of PEFT's initialisation
    (rows of norm ~0.6), so the clients' learning rate means the same every round; and the
    components come out in SVD order, so a lower-rank view (`truncate`) is the best one at its rank."""
    b_cat = np.concatenate([c * b.astype(np.float64) for b, _, c in terms], axis=1)  # (out, K)
    a_cat = np.concatenate([a.astype(np.float64) for _, a, _ in terms], axis=0)  # (K, in)
    # The sum b_cat @ a_cat has rank <= K (a few ranks' worth), far below out and in: QR of each thin
    # factor leaves an SVD of a K x K core instead of a dense (out x in) one per module. QR's Q has
    # orthonormal columns even where a factor is rank-deficient, so A always gets R orthonormal rows.
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    u, vt = q_b @ u, vt @ q_a.T
    kept = min(rank, s.size)
    b, a = u[:, :kept] * (s[:kept] / scale), vt[:kept]
    if kept < rank:  # only when the rank exceeds the module's own dimensions: the rest is zero
        b = np.pad(b, ((0, 0), (0, rank - kept)))
        a = np.pad(a, ((0, rank - kept), (0, 0)))
    return Factored(b, a, s)


def exact_average(states: Sequence[State], weights: Sequence[float], reference: State, alpha: float) -> State:
    """The LoRA tensors of the global adapter after `states` (replies, each at its own rank ρ_i),
    weighted by `weights`, from `reference` (the global adapter they were sent, rank R).

    Per module: sum_i w_i·(alpha/ρ_i)·B_i·A_i, plus, for each client, the components ρ_i..R of the
    global that it was not sent (they stay, as in `lift`), factored to rank R with scaling alpha/R.
    At one rank the second part is empty and this is the weighted mean of the products."""
    total = float(sum(weights))
    shares = [w / total for w in weights]
    full = payload_rank(reference)
    out: State = {}
    for a_name in [name for name in reference if LORA_A in name]:
        b_name = a_name.replace(LORA_A, LORA_B)
        terms, received = [], np.zeros(full)  # received[j]: share of the clients that were sent component j
        for state, share in zip(states, shares, strict=True):
            rank = state[a_name].shape[0]
            terms.append((state[b_name], state[a_name], share * alpha / rank))
            received[:rank] += share
        terms.append((reference[b_name] * (1.0 - received), reference[a_name], alpha / full))
        factored = average_products(terms, alpha / full, full)
        out[b_name] = factored.b.astype(reference[b_name].dtype)
        out[a_name] = factored.a.astype(reference[a_name].dtype)
    return out


class RankAwareLora(StrategyWrapper):
    """Heterogeneous ranks around `strategy`: each node gets the global adapter at its own rank, and
    each reply is lifted back to the global rank before `strategy` aggregates it as usual.
    Subclasses change what becomes of the aggregate through one hook, `combine`."""

    def __init__(self, strategy: Strategy, global_rank: int) -> None:
        super().__init__(strategy)
        self.global_rank = global_rank
        self.node_ranks: dict[int, int] = {}  # learnt from replies; a node not heard from gets the global rank
        self.current_arrays = ArrayRecord()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return self._at_node_ranks(self.strategy.configure_train(server_round, arrays, config, grid), arrays)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        reference = _numpy(self.current_arrays)
        lifted = []
        for reply in replies:
            if reply.has_error():
                lifted.append(reply)
                continue
            own = _numpy(reply.content[k.ARRAYS])
            self._remember_rank(reply, own)
            lifted.append(_with_arrays(reply, lift(own, reference)))
        arrays, metrics = self.strategy.aggregate_train(server_round, lifted)
        if arrays is None:
            return arrays, metrics
        return self.combine(arrays, [r for r in replies if not r.has_error()], reference), metrics

    def combine(self, arrays: ArrayRecord, replies: list[Message], reference: State) -> ArrayRecord:
        """The new global adapter from the inner strategy's aggregate of the lifted replies (here:
        that aggregate), the replies as sent and the global adapter they started from."""
        return arrays

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._at_node_ranks(self.strategy.configure_evaluate(server_round, arrays, config, grid), arrays)

    def _at_node_ranks(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """Give each message to a node of lower rank the global adapter at that rank. Flower's FedAvg
        shares one RecordDict among all its messages, so such a message gets a RecordDict of its own."""
        messages = list(messages)
        views: dict[int, ArrayRecord] = {}
        for message in messages:
            rank = self.node_ranks.get(message.metadata.dst_node_id, self.global_rank)
            if rank >= self.global_rank or k.ARRAYS not in message.content:
                continue
            if rank not in views:
                views[rank] = _record(truncate(_numpy(arrays), rank))
            content = {key: message.content[key] for key in message.content.keys()}
            message.content = RecordDict({**content, k.ARRAYS: views[rank]})
        return messages

    def _remember_rank(self, reply: Message, own: State) -> None:
        info = reply.content.get(k.CLIENT_INFO)
        stated = info.get(k.LORA_RANK) if isinstance(info, ConfigRecord) else None
        valid = isinstance(stated, int) and not isinstance(stated, bool) and 1 <= stated <= self.global_rank
        rank = stated if valid else payload_rank(own)
        if rank is not None:
            self.node_ranks[reply.metadata.src_node_id] = rank


class ExactLora(RankAwareLora):
    """`exact`: the LoRA tensors are the mean of the clients' products, factored back to the global
    rank (`exact_average`); the other tensors and the metrics are the inner strategy's."""

    def __init__(self, strategy: Strategy, global_rank: int, alpha: float) -> None:
        super().__init__(strategy, global_rank)
        self.alpha = alpha

    def combine(self, arrays: ArrayRecord, replies: list[Message], reference: State) -> ArrayRecord:
        weights = [float(r.content[k.METRICS][k.NUM_EXAMPLES]) for r in replies]
        lora = exact_average([_numpy(r.content[k.ARRAYS]) for r in replies], weights, reference, self.alpha)
        return ArrayRecord({name: Array(lora[name]) if name in lora else arrays[name] for name in arrays.keys()})


def with_lora_aggregation(strategy: Strategy, cfg: FedtuneConfig) -> Strategy:
    """`strategy` under the LoRA-aware wrapper cfg.lora asks for; itself for `naive` or `ffa` at one
    rank, where the inner strategy's mean is already the right one (config.py checks the rest)."""
    if cfg.lora.aggregation == "exact":
        return ExactLora(strategy, cfg.lora.r, cfg.lora.alpha)
    if cfg.lora.ranks():
        return RankAwareLora(strategy, cfg.lora.r)
    return strategy


def _numpy(record: ArrayRecord) -> State:
    return {name: array.numpy() for name, array in record.items()}


def _record(state: State) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def _with_arrays(reply: Message, state: State) -> Message:
    """`reply` with other arrays: same sender, metrics and client record (a copy: Flower's Message
    constructor writes to the metadata it is given)."""
    content = {key: reply.content[key] for key in reply.content.keys()}
    return Message(RecordDict({**content, k.ARRAYS: _record(state)}), metadata=copy.copy(reply.metadata))
