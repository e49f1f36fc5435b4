"""When a run stops, each round's client learning rate, and which round's adapter the run releases:
all follow from the config and the metrics rows committed so far, so a resumed run continues exactly
as an uninterrupted one would.

Without DP a run may stop early (early_stopping_patience): once the clients' mean validation loss has
not improved for that many rounds. With cooldown_rounds, it does not stop at once: the learning rate
first falls linearly from its current value towards zero over that many rounds, and the run stops
after them. The last adapter then sits where a small rate settled it, not wherever the last full-rate
round left it; a decay started when progress stalls is the "cooldown" of warmup-stable-decay schedules
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
A cooldown is judged as the stop is, on the clients' validation splits: if, when it is over, their
mean validation loss is not lower than after the round it started from, the run releases that round's
adapter instead (kept_round). A set that overfits (its validation loss rising since the best round)
keeps what it had; one whose loss was only noisy at the full rate keeps what the cooldown settled.
Neither torch's ReduceLROnPlateau nor transformers' EarlyStoppingCallback computes this from a run's
history alone, which a resume needs, hence these few lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedtune.config import FedtuneConfig


@dataclass(frozen=True)
class Plateau:
    best: int  # the round with the lowest client validation loss until `ran_out` (the earliest, on a tie)
    ran_out: int  # the first round after which `patience` scored rounds had followed `best` without a lower loss


def find_plateau(rows: list[dict[str, Any]], patience: int) -> Plateau | None:
    """The first time the patience ran out, or None (also with patience 0). Rounds in which no client
    evaluated (or one withheld its scores: NaN) do not count."""
    if not patience:
        return None
    best, best_loss, waited = 0, math.inf, 0
    for row in rows:
        loss = row.get("client_eval_loss")
        if loss is None or math.isnan(loss):
            continue
        if loss < best_loss:
            best, best_loss, waited = row["round"], loss, 0
            continue
        waited += 1
        if waited >= patience:
            return Plateau(best, row["round"])
    return None


def last_round(cfg: FedtuneConfig, rows: list[dict[str, Any]]) -> int:
    """The round the run ends after: cfg.rounds, or earlier once the patience ran out and the cooldown
    that follows it is over."""
    plateau = find_plateau(rows, cfg.early_stopping_patience)
    return cfg.rounds if plateau is None else min(cfg.rounds, plateau.ran_out + cfg.cooldown_rounds)


def round_learning_rate(cfg: FedtuneConfig, round_: int, rows: list[dict[str, Any]]) -> float:
    """The client learning rate of round `round_`, given the rows of the rounds before it:
    train.lr_schedule's, or, in the cooldown, the rate the round after the plateau would have had,
    scaled by (cooldown_rounds + 1 - k) / (cooldown_rounds + 1) in the cooldown's k-th round."""
    plateau = find_plateau(rows, cfg.early_stopping_patience)
    if plateau is None or not cfg.cooldown_rounds or round_ <= plateau.ran_out:
        return cfg.train.learning_rate_at(round_, cfg.rounds)
    rate = cfg.train.learning_rate_at(plateau.ran_out + 1, cfg.rounds)
    k = round_ - plateau.ran_out
    return rate * max(0, cfg.cooldown_rounds + 1 - k) / (cfg.cooldown_rounds + 1)


def kept_round(cfg: FedtuneConfig, rows: list[dict[str, Any]]) -> int:
    """The round whose adapter the run releases: the last one in `rows`, or, once a cooldown is over
    without lowering the clients' validation loss below that of the round it started from, that round."""
    last = rows[-1]["round"]
    plateau = find_plateau(rows, cfg.early_stopping_patience)
    if plateau is None or not cfg.cooldown_rounds or last < last_round(cfg, rows):
        return last
    loss = {row["round"]: row.get("client_eval_loss") for row in rows}
    rejected = loss[last] is not None and loss[last] >= loss[plateau.ran_out]
    return plateau.ran_out if rejected else last
