"""When a run stops, each round's learning rate and which round's adapter is released, from the
config and the rows committed so far."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import FedtuneConfig
from fedtune.server.schedule import Plateau, find_plateau, kept_round, last_round, round_learning_rate


def rows(*losses):
    return [{"round": 0, "client_eval_loss": None}] + [
        {"round": r, "client_eval_loss": loss} for r, loss in enumerate(losses, start=1)]


def config(patience=2, cooldown=0, rounds=20, schedule="constant"):
    return FedtuneConfig.from_flat({"dp.enabled": False, "rounds": rounds, "early_stopping_patience": patience,
                                    "cooldown_rounds": cooldown, "train.lr_schedule": schedule,
                                    "train.learning_rate": 0.006})


def test_the_plateau_is_the_first_time_the_patience_ran_out_after_the_earliest_lowest_loss():
    assert find_plateau(rows(1.0, 0.9, 0.95, 0.91), 2) == Plateau(best=2, ran_out=4)
    assert find_plateau(rows(1.0, 0.9, 0.95), 2) is None  # one round since the best
    assert find_plateau(rows(0.5, 0.5, 0.5), 2) == Plateau(1, 3)  # equal is not better
    assert find_plateau(rows(1.0, 0.9, None, 0.95), 2) is None  # a round nobody evaluated does not count
    assert find_plateau(rows(1.0, 0.9, None, 0.95, 0.93), 2) == Plateau(2, 5)
    assert find_plateau(rows(1.0, 0.9, float("nan"), 0.95), 2) is None  # withheld scores do not count either
    assert find_plateau(rows(1.0, 0.9, 0.95, 0.91), 0) is None  # patience 0: every round runs
    assert find_plateau(rows(), 2) is None
    # a better loss during the cooldown does not move the plateau: the first time is kept
    assert find_plateau(rows(1.0, 0.9, 0.95, 0.91, 0.5, 0.4), 2) == Plateau(2, 4)


def test_without_a_cooldown_the_run_stops_when_the_patience_runs_out():
    cfg = config(patience=2)
    assert last_round(cfg, rows(1.0, 0.9, 0.95)) == 20
    assert last_round(cfg, rows(1.0, 0.9, 0.95, 0.91)) == 4
    assert [round_learning_rate(cfg, r, rows(1.0, 0.9, 0.95, 0.91)) for r in (1, 4, 5)] == [0.006] * 3


def test_a_cooldown_lowers_the_rate_linearly_after_the_plateau_then_stops_the_run():
    cfg, history = config(patience=2, cooldown=3), rows(1.0, 0.9, 0.95, 0.91)  # ran out after round 4
    assert last_round(cfg, history) == 7
    rates = [round_learning_rate(cfg, r, history) for r in range(1, 8)]
    assert rates == pytest.approx([0.006] * 4 + [0.0045, 0.003, 0.0015])
    # rows of the cooldown rounds, even a better loss among them, change neither the rates nor the stop
    later = history + [{"round": 5, "client_eval_loss": 0.2}, {"round": 6, "client_eval_loss": 0.1}]
    assert round_learning_rate(cfg, 7, later) == pytest.approx(0.0015) and last_round(cfg, later) == 7
    assert last_round(config(patience=2, cooldown=30), history) == 20  # the rounds cap still holds


def test_a_cooldown_starts_from_the_rate_the_schedule_had_reached():
    cfg, history = config(patience=2, cooldown=1, rounds=10, schedule="linear"), rows(1.0, 0.9, 0.95, 0.91)
    assert round_learning_rate(cfg, 4, history) == pytest.approx(0.006 * 0.7)  # before the plateau: the schedule's
    assert round_learning_rate(cfg, 5, history) == pytest.approx(0.006 * 0.6 / 2)  # round 5's rate, halved


def test_a_cooldown_needs_the_patience_it_follows():
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="`cooldown_rounds`.*early_stopping_patience runs out"):
        config(patience=0, cooldown=3)


def test_a_cooldown_that_lowers_the_clients_validation_loss_is_kept_and_one_that_raises_it_is_not():
    cfg, history = config(patience=2, cooldown=2), rows(1.0, 0.9, 0.95, 0.91)  # ran out after round 4
    def cooled(*losses):
        return history + [{"round": r, "client_eval_loss": loss} for r, loss in enumerate(losses, start=5)]

    assert kept_round(cfg, cooled(0.8, 0.9)) == 6  # ends below round 4's 0.91: kept
    assert kept_round(cfg, cooled(0.8, 0.91)) == 4  # not below: round 4's adapter
    assert kept_round(cfg, cooled(0.8)) == 5  # not over yet: the last
    assert kept_round(config(patience=2), history) == 4  # no cooldown: the last
    assert kept_round(cfg, rows(1.0, 0.9, 0.8)) == 3  # no plateau: the last


def test_the_run_releases_the_round_a_rejected_cooldown_started_from(tmp_path):
    from fedtune.server.run_dir import Checkpoint, RunDirectory

    cfg = config(patience=2, cooldown=2)
    losses = (1.0, 0.9, 0.95, 0.91, 0.95, 0.93)  # the cooldown (rounds 5, 6) ends above round 4's 0.91
    run = RunDirectory.create(tmp_path / "run", cfg)
    for r in range(7):
        run.commit(Checkpoint(r, {"w": torch.full((2,), float(r))}, rows(*losses[:r])))
    last = run.latest_checkpoint()
    assert last.round == 6 and run.released(last, cfg).round == 4
    assert torch.equal(run.released(last, cfg).arrays["w"], torch.full((2,), 4.0))
    run.commit(Checkpoint(6, {"w": torch.full((2,), 6.0)}, rows(*losses[:5], 0.5)))  # now it ends lower
    assert run.released(run.latest_checkpoint(), cfg).round == 6
