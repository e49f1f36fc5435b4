"""The server's side of `fedtune audit`: score every canary with the final global adapter, set the
one-run lower bound beside the run's theoretical ε, and write RUN_DIR/audit.json.

The canaries and their exact membership are rebuilt from the run's saved config
(data/canaries.py), so nothing about them travels with the federation's messages.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from typing import Any

from flwr.app import ArrayRecord

from fedtune import __version__
from fedtune.config import FedtuneConfig
from fedtune.data.canaries import Canaries, gradient_direction
from fedtune.durable import write_json_atomic
from fedtune.errors import ConfigError
from fedtune.privacy.audit import AUDIT_FILE, AuditResult, audit, canaries_needed, gaussian_estimate
from fedtune.privacy.ledger import PrivacyLedger, read_ledger
from fedtune.server.run_dir import OBSERVED, Checkpoint, RunDirectory
from fedtune.tasks.base import get_task

REFERENCE_RECORDS = 256  # server hold-out records whose gradients the server-vantage fit takes as nuisance
CLIENT_SCORE = "cosine between the canary institution's direction and the final global adapter's change since round 0"
SERVER_SCORE = ("sum over rounds of the t-statistic of the canary's least-squares weight in its institution's "
                "update, along its unit descent direction at the round's global weights (under AdamW scaled by a "
                "modelled 1/√v), beside the other institutions' mean update and the server's hold-out records' "
                "directions")
SERVER_GRADIENT_SCORE = SERVER_SCORE.replace("along its unit descent direction at the round's global weights",
                                             "along its gradient canary's direction −u_j")
FINAL_GRADIENT_SCORE = ("cosine between the gradient canary's direction −u_j and the final global adapter's change "
                        "since round 0")
ESTIMATE_METHOD = ("one-shot estimate (Andrew et al. 2024, arXiv 2302.03098): Gaussians with a pooled variance fitted "
                   "to members' and non-members' cosines, ε of that μ-GDP pair at δ; an estimate, not a bound")
INF = "inf"  # as in the privacy report: ∞ is the string "inf" in JSON
METHOD = ("one-run audit (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846, Theorem 5.2), guesses swept with a "
          "Bonferroni correction")


def canary_losses(cfg: FedtuneConfig, arrays: ArrayRecord) -> tuple[Canaries, list[float]]:
    """(the run's canaries, each one's loss under `arrays`), in canary order, on the server's model."""
    from fedtune.models.adapter import load_record

    task = get_task(cfg.model.task)
    canaries = _canaries(task.federation(cfg.data, cfg.clients, cfg.seed).canaries)
    model = task.build_model(cfg.model, cfg.lora, cfg.data, cfg.seed)
    load_record(model, arrays)
    scored = task.tokenize(task.tokenizer(cfg.model), task.canary_records(canaries), cfg.model.max_length)
    return canaries, task.example_losses(model, scored)


def observed_scores(cfg: FedtuneConfig, run: RunDirectory, upto: int) -> tuple[Canaries, list[float]]:
    """(the run's canaries, each one's score from the server's vantage point), in canary order.

    The server sees every sampled institution's update in every round (without SecAgg+). In each
    round t, for each institution that trained, the auditor takes the unit descent direction
    −g_i/‖g_i‖ of every canary i drawn for that institution (`plan.sites[i]`, members and
    non-members alike), with g_i the gradient of its loss at the round's global weights θ_{t−1}, and
    fits the institution's update Δ = θ_client − θ_{t−1} by least squares on those directions, the
    other institutions' mean update and the descent directions of up to REFERENCE_RECORDS records of
    the server's own hold-out (_contributions). Canary i's score is its fitted weight divided by
    the weight's standard error, summed over the rounds. Training on a canary adds a (clipped,
    noised) step along −g_i to its institution's update, so a member's weight is positive and a
    non-member's is about zero.
    Under AdamW the step is along −g_i scaled per coordinate by 1/√v, so every direction is scaled
    so too, with v modelled from the hold-out's gradients (_adam_scale).

    Every institution's ε bounds this view: DP-SGD's accounting covers every noised step an
    institution releases, and its round update is computed from those steps alone (post-processing).
    The view reads no record count: a canary's coin changes its institution's n, which that ε treats
    as public, so a score that read the reported counts would not be bounded by it."""
    import torch

    from fedtune.data.text import pad_batch
    from fedtune.models.adapter import load_record

    task = get_task(cfg.model.task)
    fed = task.federation(cfg.data, cfg.clients, cfg.seed)
    canaries = _canaries(fed.canaries)
    rounds = run.observed_rounds(upto)
    if not rounds:
        raise ConfigError(f"{run.path} has no record of the updates the server received ({OBSERVED}/), so it cannot "
                          "be audited from the server's vantage point. It was run with SecAgg+ (the server never sees "
                          "one institution's update) or before fedtune kept that record; use `--vantage final`.")
    model = task.build_model(cfg.model, cfg.lora, cfg.data, cfg.seed)
    model.eval()  # no dropout: the gradient at exactly θ_{t−1}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = task.tokenizer(cfg.model)
    data = task.tokenize(tokenizer, task.canary_records(canaries), cfg.model.max_length)
    reference = task.tokenize(tokenizer, fed.select(fed.server_test[:REFERENCE_RECORDS]), cfg.model.max_length)
    size = sum(p.numel() for p in params.values())

    def canary_gradients(held: list[int]) -> torch.Tensor:
        """Each held canary's gradient at θ_{t−1}: its own, or, for a gradient canary, its direction u_j."""
        if cfg.data.canary_kind == "gradient":
            return torch.stack([torch.from_numpy(gradient_direction(cfg.seed, i, size)) for i in held])
        return torch.stack([_gradient(model, params, pad_batch([data[i]])) for i in held])

    scores = [0.0] * len(canaries.members)
    for round_ in rounds:  # one round's updates in memory at a time
        updates = run.observed(round_)
        start = Checkpoint.from_file(run.checkpoint_path(round_ - 1)).arrays
        load_record(model, ArrayRecord(torch_state_dict=start))
        moves = {name: torch.cat([(arrays[n].float() - start[n].float()).flatten() for n in params])
                 for name, arrays in updates.items()}
        references = torch.stack([_gradient(model, params, pad_batch([reference[j]])) for j in range(len(reference))])
        scale = _adam_scale(references, cfg.train.batch_size) if cfg.train.optimizer == "adamw" else None
        typical = list(_unit_descent(references, scale))
        for name, move in moves.items():
            held = [i for i, site in enumerate(canaries.plan.sites) if client_name(site) == name]
            if not held:
                continue
            directions = _unit_descent(canary_gradients(held), scale)
            nuisance = [m for other, m in moves.items() if other != name]
            nuisance = ([torch.stack(nuisance).mean(dim=0)] if nuisance else []) + typical
            if cfg.dp.public_streams:
                nuisance = _known_stream_noise(cfg, params, round_, name) + nuisance
            for i, weight in zip(held, _contributions(move, directions, nuisance), strict=True):
                scores[i] += weight
    return canaries, scores


def gradient_canary_scores(cfg: FedtuneConfig, run: RunDirectory, upto: int) -> tuple[Canaries, list[float]]:
    """(the run's gradient canaries, each one's score on the released adapter): the cosine between the
    canary's descent direction −u_j and θ_upto − θ_0, the change of the global adapter over the run
    (what anyone given the final adapter, and the initial one fedtune derives from the seed, can compute)."""
    import torch

    task = get_task(cfg.model.task)
    canaries = _canaries(task.federation(cfg.data, cfg.clients, cfg.seed).canaries)
    model = task.build_model(cfg.model, cfg.lora, cfg.data, cfg.seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    start = Checkpoint.from_file(run.checkpoint_path(0)).arrays
    end = Checkpoint.from_file(run.checkpoint_path(upto)).arrays
    change = torch.cat([(end[n].double() - start[n].double()).flatten() for n in names])
    norm = float(change.norm())
    scores = [float(-torch.from_numpy(gradient_direction(cfg.seed, i, change.numel())).double() @ change) / norm
              if norm > 0 else 0.0 for i in range(len(canaries.members))]
    return canaries, scores


def canary_client_scores(cfg: FedtuneConfig, run: RunDirectory, upto: int) -> tuple[tuple[bool, ...], list[float]]:
    """(each canary institution's membership, its score), in canary order: the cosine between its
    direction c_j and θ_upto − θ_0, the change of the global adapter over the run (Andrew et al.
    2024's final-model statistic; strategies/canary_clients.py plants them). Everyone given the final
    adapter, and the initial one that fedtune derives from the seed, can compute it."""
    import numpy as np

    from fedtune.strategies.canary_clients import flat_order
    from fedtune.strategies.client_dp import canary_clients

    canaries = canary_clients(cfg)
    start = Checkpoint.from_file(run.checkpoint_path(0)).arrays
    end = Checkpoint.from_file(run.checkpoint_path(upto)).arrays
    names = list(start)
    change = np.concatenate([(end[names[i]].double() - start[names[i]].double()).flatten().numpy()
                             for i in flat_order(names)])
    norm = float(np.linalg.norm(change))
    scores = [float(direction @ change) / norm if norm > 0 else 0.0 for direction in canaries.directions(change.size)]
    return canaries.members, scores


def _known_stream_noise(cfg: FedtuneConfig, params: dict, round_: int, client: str) -> list:
    """dp.public_streams (the white-box audit): the noise one institution's round would carry had DP-SGD
    drawn it from a generator seeded like a stream the server knows (the sampling's, dpsgd.PUBLIC_STREAMS;
    the defect issue #18 fixed had it seeded like the sampling): per stream and step,
    Gaussian draws parameter by parameter, as Opacus draws them. Under q = 1 a round is one step per
    local epoch. A correct client's noise is independent of all of them, so they are only extra columns
    of the fit; noise drawn from one of them is fitted away, and every canary's step is left bare."""
    import torch

    from fedtune.privacy.dpsgd import PUBLIC_STREAMS, RoundSeeds, round_seed

    seeds = RoundSeeds.derived(round_seed(cfg.seed, round_, client))
    vectors = []
    for stream in PUBLIC_STREAMS:
        generator = seeds.generator(stream)
        vectors += [torch.cat([torch.normal(0.0, 1.0, size=p.shape, generator=generator).flatten()
                               for p in params.values()]) for _ in range(cfg.train.local_epochs)]
    return vectors


def _gradient(model, params: dict, batch: dict):
    """One record's loss gradient over the trainable weights, flattened (zeros where none flows)."""
    import torch

    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in params.values()])


def _adam_scale(references, batch_size: int):
    """AdamW's per-coordinate step scale 1/√v, modelled: v averages the squared mini-batch gradient,
    whose expectation is (mean record gradient)² + (variance of record gradients) / B, both taken
    from the server's hold-out records. An AdamW update is then about −lr · Σ_steps g / √v, so a
    canary moves it along its gradient scaled by 1/√v, not along the gradient itself."""
    mean = references.mean(dim=0)
    v = mean ** 2 + references.var(dim=0, unbiased=False) / batch_size
    floor = v[v > 0].mean() * 1e-6 if bool((v > 0).any()) else 1.0  # coordinates no record moves
    return 1 / (v + floor).sqrt()


def _unit_descent(gradients, scale=None):
    """Each row's descent direction −g (times `scale`, AdamW's per-coordinate step scale), as a unit
    vector (0 where g = 0)."""
    directions = -gradients if scale is None else -gradients * scale
    norms = directions.norm(dim=1, keepdim=True)
    return directions / norms.clamp_min(1e-30)


def _contributions(move, directions, nuisance: list) -> list[float]:
    """Each canary's evidence of a step in one institution's update: its weight in the least-squares
    fit of the update on the descent directions of every canary that institution might hold, beside
    nuisance directions that the update follows whether or not a canary is in (the other
    institutions' mean update, the shared task, and the descent directions of the server's own
    hold-out records, what ordinary data moves), divided by that weight's standard error.

    Why a joint fit and not each canary's projection alone: canaries with the same label have
    strongly aligned gradients (the classifier head dominates them), and ordinary records' gradients
    align with them too, so a projection credits a non-member with the steps of aligned members and
    data. The fit separates them while the directions are linearly independent; it keeps at most
    half as many columns as there are trainable weights (hold-out directions are dropped first).

    Why the t-statistic (weight / standard error, with the residual's variance) and not the weight:
    a canary whose direction is nearly a combination of the others gets a large weight by chance,
    and the weights' ranking puts such non-members at the top, where the audit's guesses are made.
    On the `--no-dp` run of docs/privacy.md it took the bound from 1.37 (the weights) to 1.68."""
    import torch

    room = max(0, move.numel() // 2 - len(directions))
    columns = [directions] + ([torch.stack(nuisance[:room])] if nuisance[:room] else [])
    design = torch.cat(columns).T.double()  # weights x columns
    target = move.double()
    weights = torch.linalg.lstsq(design, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual = target - design @ weights
    variance = float(residual @ residual) / max(design.shape[0] - design.shape[1], 1)
    spread = torch.diagonal(torch.linalg.pinv(design.T @ design))[: len(directions)]
    # An exact fit (no residual at all) leaves every standard error 0: a floor keeps the ratios finite.
    stderr = (variance * spread).clamp_min(0).sqrt().clamp_min(1e-150)
    return (weights[: len(directions)] / stderr).tolist()


def _score_described(cfg: FedtuneConfig, vantage: str) -> str:
    if cfg.data.canary_kind == "gradient":
        return SERVER_GRADIENT_SCORE if vantage == "server" else FINAL_GRADIENT_SCORE
    return get_task(cfg.model.task).audit_score if vantage == "final" else SERVER_SCORE


def client_name(site: int) -> str:
    """The institution name a simulated client trains under (client/app.py)."""
    return f"client-{site:04d}"


def institution_name(site: int) -> str:
    """The name `fedtune deploy-local` gives the institution of partition `site`: clinic-a, clinic-b, ..."""
    return f"clinic-{string.ascii_lowercase[site]}"


def _canaries(canaries: Canaries | None) -> Canaries:
    if canaries is None:
        raise ConfigError("This run has no canaries (data.canaries = 0), so there is nothing to audit. Start an "
                          "audited run with `fedtune audit --canaries M --out RUN_DIR`.")
    return canaries


def client_level_epsilon(ledger: PrivacyLedger) -> float:
    """The run's client-level ε (one institution as a whole): what a canary institution enjoys."""
    entry = ledger.client_level
    if entry is None:
        raise ConfigError("This run's ledger has no client-level DP entry, so its canary institutions have no "
                          "theoretical ε to be audited against; audit runs with dp.client_dp `fixed` or `adaptive`.")
    return math.inf if entry.get("epsilon") is None and entry["rounds"] else float(entry.get("epsilon") or 0.0)


def theoretical_epsilon(ledger: PrivacyLedger) -> float:
    """The run's reported ε: the largest cumulative ε of any institution. A canary is one record of
    one institution (under dp.unit `user`, one user with all of its copies), protected by that
    institution's own ε, so the largest is the bound that every canary enjoys. ∞ without DP-SGD, or
    if any institution trained without noise."""
    spent = ledger.epsilon_max()  # ∞ once anyone trained without noise
    return math.inf if spent is None else float(spent)


def holders_epsilon(ledger: PrivacyLedger, canaries: Canaries) -> dict[str, Any]:
    """The theoretical ε of each institution that held canaries, and how many it held (members and
    non-members alike): one test over all canaries is checked against the largest of them, which bounds
    every canary; this says which institution's guarantee each canary stood under."""
    held = Counter(client_name(site) for site in canaries.plan.sites)
    if not ledger.dp_enabled:
        return {name: {"canaries": count, "epsilon": INF} for name, count in sorted(held.items())}
    spent = {name: ledger.epsilon_of(name) for name in held}
    return {name: {"canaries": count, "epsilon": spent[name] if math.isfinite(spent[name]) else INF}
            for name, count in sorted(held.items())}


def run_audit(run: RunDirectory, confidence: float, vantage: str = "final") -> dict[str, Any]:
    """Audit the run up to its last committed round, from `vantage` ("final": the final adapter's loss
    on each canary; "server": every update the server received); writes RUN_DIR/audit.json and
    returns what it holds."""
    cfg = run.config()
    if vantage == "server" and cfg.dp.reproducible_noise:
        raise ConfigError(f"{run.path} ran with dp.reproducible_noise: the server knows the seed and can regenerate "
                          "every institution's noise, so no ε protects the updates it saw, and a bound from them "
                          "could be compared with nothing. Audit the released adapter instead (--vantage final).")
    checkpoint = run.newest_checkpoint("the audit")
    if checkpoint is None or checkpoint.round == 0:
        raise ConfigError(f"{run.path} has no trained round to audit. Let the run finish (or resume it with "
                          f"`fedtune simulate --resume {run.path}`), then audit it again.")
    if vantage == "final":  # the adapter the run released (after a rejected cooldown, an earlier round's)
        checkpoint = run.released(checkpoint, cfg)
    ledger = read_ledger(run.path)
    if cfg.dp.canary_clients:
        return _write_audit(run, _audit_canary_clients(cfg, run, ledger, checkpoint.round, confidence, vantage))
    if vantage == "server":
        canaries, scores = observed_scores(cfg, run, checkpoint.round)
    elif cfg.data.canary_kind == "gradient":
        canaries, scores = gradient_canary_scores(cfg, run, checkpoint.round)
        losses = []
    else:
        canaries, losses = canary_losses(cfg, ArrayRecord(torch_state_dict=checkpoint.arrays))
        # Higher score = more likely in. A canary with no loss to score (its answer truncated away) gives
        # no evidence of membership: it scores lowest.
        scores = [-loss if math.isfinite(loss) else -math.inf for loss in losses]
    result = audit(scores, canaries.members, cfg.dp.delta, confidence)
    record = audit_record(result, theoretical_epsilon(ledger), cfg, checkpoint.round, vantage)
    record["epsilon_by_institution"] = holders_epsilon(ledger, canaries)
    if vantage == "server" or cfg.data.canary_kind == "gradient":
        record["canary_scores"] = scores
    else:
        record["canary_losses"] = [loss if math.isfinite(loss) else None for loss in losses]
    record["canary_members"] = list(canaries.members)
    return _write_audit(run, record)


def _audit_canary_clients(cfg: FedtuneConfig, run: RunDirectory, ledger: PrivacyLedger, round_: int,
                          confidence: float, vantage: str) -> dict[str, Any]:
    """audit.json for a run with canary institutions: the one-run bound and Andrew et al.'s estimate,
    beside the client-level ε."""
    if vantage != "final":
        raise ConfigError("Canary institutions are scored on the released global adapter (`--vantage final`); "
                          "the server-vantage audit scores canary records (--canaries) instead.")
    members, scores = canary_client_scores(cfg, run, round_)
    result = audit(scores, members, cfg.dp.delta, confidence)
    record = audit_record(result, client_level_epsilon(ledger), cfg, round_, vantage)
    estimate = gaussian_estimate(scores, members, cfg.dp.delta)
    record.update(unit="client", score=CLIENT_SCORE, canary_repeats=1,
                  epsilon_estimate=None if estimate is None else estimate.epsilon,
                  epsilon_estimate_interval=None if estimate is None else list(estimate.epsilon_interval),
                  estimate_method=ESTIMATE_METHOD, canary_scores=scores, canary_members=list(members))
    return record


def _write_audit(run: RunDirectory, record: dict[str, Any]) -> dict[str, Any]:
    write_json_atomic(run.path / AUDIT_FILE, record)
    return record


def audit_record(result: AuditResult, epsilon: float, cfg: FedtuneConfig, round_: int,
                 vantage: str = "final") -> dict[str, Any]:
    """audit.json's fields (per-canary scores and membership are added after them)."""
    return {
        "fedtune_version": __version__,
        "method": METHOD,
        "vantage": vantage,
        "score": _score_described(cfg, vantage),
        "task": cfg.model.task,
        "canary_kind": cfg.data.canary_kind,  # `gradient`: each canary's gradient is C times a random direction
        "round": round_,
        "canaries": result.canaries,
        "canaries_in": result.members,  # of them, how many were put into training
        "canary_repeats": cfg.data.canary_repeats,
        "unit": cfg.dp.unit,  # what a canary is: a record, or a user whose copies share one id
        "guesses": result.guesses,
        "guesses_in": result.guesses_in,
        "guesses_out": result.guesses_out,
        "correct": result.correct,
        "epsilon_lower_bound": result.epsilon_lower_bound,
        "epsilon_theoretical": epsilon if math.isfinite(epsilon) else INF,
        "delta": result.delta,
        "confidence": result.confidence,
        "hypotheses": result.hypotheses,
        "auc": result.auc,
        "tpr_at_fpr_0.01": result.tpr_at_fpr,
        "consistent": result.epsilon_lower_bound <= epsilon,
        # The audit's power: the bound had every canary been scored perfectly. Below the theoretical ε, no
        # outcome of this audit could have shown a leak as large as the guarantee allows.
        "epsilon_largest_certifiable": result.largest_certifiable,
        "canaries_to_certify_theoretical": (canaries_needed(epsilon, result.delta, result.confidence)
                                            if math.isfinite(epsilon) else None),  # None: unreachable, or ε = ∞
    }
