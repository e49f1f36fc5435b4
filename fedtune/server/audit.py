"""The server's side of `fedtune audit`: score every canary with the final global adapter, set the
one-run lower bound beside the run's theoretical ε, and write RUN_DIR/audit.json.

The canaries and their exact membership are rebuilt from the run's saved config
(data/canaries.py), so nothing about them travels with the federation's messages.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import ArrayRecord

from fedtune import __version__
from fedtune.config import FedtuneConfig
from fedtune.data.canaries import Canaries
from fedtune.durable import write_json_atomic
from fedtune.errors import ConfigError
from fedtune.privacy.audit import AUDIT_FILE, AuditResult, audit, canaries_needed
from fedtune.privacy.ledger import PrivacyLedger, read_ledger
from fedtune.server.run_dir import RunDirectory
from fedtune.tasks.base import get_task

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


def _canaries(canaries: Canaries | None) -> Canaries:
    if canaries is None:
        raise ConfigError("This run has no canaries (data.canaries = 0), so there is nothing to audit. Start an "
                          "audited run with `fedtune audit --canaries M --out RUN_DIR`.")
    return canaries


def theoretical_epsilon(ledger: PrivacyLedger) -> float:
    """The run's reported ε: the largest cumulative ε of any institution. A canary is one record of
    one institution (under dp.unit `user`, one user with all of its copies), protected by that
    institution's own ε, so the largest is the bound that every canary enjoys. ∞ without DP-SGD, or
    if any institution trained without noise."""
    spent = ledger.epsilon_max()  # ∞ once anyone trained without noise
    return math.inf if spent is None else float(spent)


def run_audit(run: RunDirectory, confidence: float) -> dict[str, Any]:
    """Audit the run's last committed round; writes RUN_DIR/audit.json and returns what it holds."""
    cfg = run.config()
    checkpoint = run.latest_checkpoint()
    if checkpoint is None or checkpoint.round == 0:
        raise ConfigError(f"{run.path} has no trained round to audit. Let the run finish (or resume it with "
                          f"`fedtune simulate --resume {run.path}`), then audit it again.")
    canaries, losses = canary_losses(cfg, ArrayRecord(torch_state_dict=checkpoint.arrays))
    # Higher score = more likely in. A canary with no loss to score (its answer truncated away) gives
    # no evidence of membership: it scores lowest.
    scores = [-loss if math.isfinite(loss) else -math.inf for loss in losses]
    ledger = read_ledger(run.path)
    result = audit(scores, canaries.members, cfg.dp.delta, confidence)
    record = audit_record(result, theoretical_epsilon(ledger), cfg, checkpoint.round)
    record["canary_losses"] = [loss if math.isfinite(loss) else None for loss in losses]
    record["canary_members"] = list(canaries.members)
    write_json_atomic(run.path / AUDIT_FILE, record)
    return record


def audit_record(result: AuditResult, epsilon: float, cfg: FedtuneConfig, round_: int) -> dict[str, Any]:
    """audit.json's fields (per-canary losses and membership are added after them)."""
    return {
        "fedtune_version": __version__,
        "method": METHOD,
        "score": get_task(cfg.model.task).audit_score,
        "task": cfg.model.task,
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
