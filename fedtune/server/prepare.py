"""Setting a run up, the same way for every entry point: `fedtune simulate`/`audit` (cli.py),
`fedtune deploy-local` (deploy/run.py) and `flwr run` (server/app.py).

`resolve` fixes what every client must share (an absolute data.path; a classifier's label list),
`preflight` checks everything that can fail before a run directory exists, and `new_run` /
`open_run` make (or reopen) the run directory. Nothing is written before every check has passed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedtune.config import FedtuneConfig
from fedtune.data.users import train_units
from fedtune.durable import write_json_atomic
from fedtune.errors import ConfigError
from fedtune.privacy.distributed import not_one_sgd_step
from fedtune.recipe import Facts, apply_recipe
from fedtune.server.run_dir import CONFIG, DEPLOY_LOCAL, ENGINE, FLWR_RUN, SIMULATE, RunDirectory
from fedtune.tasks.base import get_task

# What a run may change when it is continued: how long it runs, and (simulation) which Ray runs it.
RESUMABLE = frozenset({"rounds", "simulation.ray_address"})
DERIVED = frozenset({"recipe.chosen", "recipe.advice"})  # follows from the others: never named as a difference
DATA_DIGEST = "data_digest.json"  # in the run directory: the records the run started on (split_digest)


def resolve(cfg: FedtuneConfig, pinned: frozenset[str] | None = None) -> FedtuneConfig:
    """The config to save with a new run: the task's resolved data config, then the private recipe's
    choices for every option not in `pinned` (the options given by hand; None: those that differ from
    the defaults, fedtune/recipe.py)."""
    data = get_task(cfg.model.task).resolve_data(cfg.data)
    cfg = cfg.with_overrides({"data.path": data.path, "data.labels": list(data.labels)})
    return apply_recipe(cfg, pinned, facts)


def facts(cfg: FedtuneConfig) -> Facts:
    """What the server knows of a run about to start, for the private recipe."""
    fed = get_task(cfg.model.task).federation(cfg.data, cfg.clients, cfg.seed)
    return Facts(labels=len(cfg.data.labels), clients=cfg.clients_sampled(),
                 records=tuple(train_units(fed, cfg.dp.unit)),
                 epsilon=cfg.dp.target_epsilon, delta=cfg.dp.delta)


def preflight(cfg: FedtuneConfig) -> None:
    """Everything that can be checked before a run directory is made; raises FedtuneError."""
    if cfg.dp.secagg and cfg.dp.client_dp != "off" and cfg.clients_sampled() < cfg.clients:
        # Here, not in the config's own checks: a run an earlier fedtune made this way still loads, so that
        # privacy-verify and the report can read it; it is not run any further.
        raise ConfigError("Invalid option `dp.secagg`: under client-level DP each institution joins a round by its "
                          "own coin flip, so a cohort can be one institution, whose update SecAgg+ cannot hide, and "
                          "leaving it out is not covered by the Poisson analysis (whether one update is summed would "
                          "depend on another institution). With SecAgg+ every institution must train every round: "
                          "strategy.fraction_train = 1 and no strategy.clients_per_round; or use client-level DP "
                          "without SecAgg+.")
    task = get_task(cfg.model.task)
    task.check_config(cfg)
    task.check_model(cfg.model, cfg.lora)  # causal-lm: converts the default model on first use
    fed = task.federation(cfg.data, cfg.clients, cfg.seed)  # raises DataError on unusable splits
    if cfg.dp.enabled:
        units = train_units(fed, cfg.dp.unit)
        largest = max(units)
        if cfg.dp.delta >= 1.0 / largest:
            raise ConfigError(f"Invalid option `dp.delta`: {cfg.dp.delta} is not below 1/n for a client with "
                              f"n={largest} {cfg.dp.unit}s, so the guarantee would be meaningless. Set it "
                              f"to {1.0 / (10 * largest):.1e} or smaller.")
        _check_one_round_fits(cfg, units)
        if cfg.dp.distributed_min_honest and (problem := not_one_sgd_step(cfg.train, largest)):
            raise ConfigError("Invalid option `dp.distributed_min_honest`: distributed DP sums one plain-SGD step "
                              f"of each institution, but for the largest institution {problem}; the "
                              "private recipe chooses these when you leave them.")
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("Invalid option `model.device`: cuda was asked for but no GPU is visible. "
                              "Set it to `cpu`.")


def _check_one_round_fits(cfg: FedtuneConfig, units: list[int]) -> None:
    """Refuse a σ given by hand (no target ε) under which no client could train even one round within
    dp.epsilon_budget: every client would decline every round, and the run would train nothing."""
    from fedtune.privacy.budget import projected_epsilon

    dp, train = cfg.dp, cfg.train
    if dp.target_epsilon > 0 or dp.epsilon_budget == float("inf") or not units:
        return
    least = min(projected_epsilon(dp, [], n, train.batch_size, train.local_epochs, train.sample_rate)
                for n in set(units))
    if least > dp.epsilon_budget:
        raise ConfigError(f"Invalid option `dp.epsilon_budget`: {dp.epsilon_budget:g} is below what one round spends "
                          f"at dp.noise_multiplier {dp.noise_multiplier:g} (ε {least:.2f} for the client that "
                          "spends least), so every client would decline every round. Raise the budget or the noise "
                          "multiplier, or give dp.target_epsilon instead and let σ be solved for it.")


def data_summary(cfg: FedtuneConfig) -> dict[str, Any]:
    """Examples and labels per client, and texts longer than model.max_length (after preflight)."""
    task = get_task(cfg.model.task)
    fed = task.federation(cfg.data, cfg.clients, cfg.seed)
    summary = task.summary(fed, cfg.data, task.tokenizer(cfg.model), cfg.model.max_length)
    if cfg.dp.enabled and cfg.dp.unit == "user":
        summary.update(records_beyond_k(fed, cfg.dp.max_records_per_user))
    return summary


def records_beyond_k(fed, k: int) -> dict[str, int]:
    """Under user-level DP: the training users with more than k records, whose steps each use a random k
    of them (privacy/dpsgd.py), and how many records that leaves out of each step."""
    from collections import Counter

    sizes = Counter(fed.users[i] for split in fed.clients for i in split.train).values()
    return {"max_records_per_user": k, "users_above_k": sum(n > k for n in sizes),
            "records_above_k": sum(max(n - k, 0) for n in sizes)}


def new_run(cfg: FedtuneConfig, target: Path, pinned: frozenset[str] | None = None, engine: str = SIMULATE,
            ) -> tuple[FedtuneConfig, RunDirectory, dict[str, Any]]:
    """Resolve and check `cfg` (`pinned`: the options given by hand, see resolve), then create the run
    directory `target` holding its config and the partition summary; returns (the saved config, the
    run directory, the summary)."""
    from fedtune.data.summary import save_partition_summary

    cfg = resolve(cfg.with_overrides({"out": str(target)}), pinned)
    preflight(cfg)
    summary = data_summary(cfg)
    digest = split_digest(get_task(cfg.model.task).federation(cfg.data, cfg.clients, cfg.seed))
    run = RunDirectory.create(target, cfg, engine)
    write_json_atomic(run.path / DATA_DIGEST, digest)
    save_partition_summary(run.path, summary)
    return cfg, run, summary


def split_digest(fed) -> dict[str, Any]:
    """The records a run trains and scores on, as read and split: their number, and a SHA-256 of every
    record with the server's hold-out, each client's training and validation indices and the users."""
    every = sorted({*fed.server_test, *(i for split in fed.clients for i in (*split.train, *split.val))})
    parts = (fed.select(every), fed.server_test, [(split.train, split.val) for split in fed.clients], fed.users)
    return {"records": len(every), "sha256": hashlib.sha256(repr(parts).encode()).hexdigest()}


def _check_data_unchanged(cfg: FedtuneConfig, run: RunDirectory) -> None:
    """A resumed run reads and splits its data again. Data that changed since the run started (the file
    edited, a directory or hub dataset updated, or read differently by another fedtune) moves records
    between the held-out split and the clients, and between clients, so each client's ε would no longer
    bound what one record reveals, and partition_summary.json would be stale."""
    saved = run.path / DATA_DIGEST
    if not saved.is_file():  # a run from before digests
        return
    try:
        was = json.loads(saved.read_text(encoding="utf-8"))
        was["records"], was["sha256"]  # noqa: B018 - both keys, or the file is not a digest
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{saved} is damaged ({type(err).__name__}: {err}), so whether the data is what the run "
                          "started on cannot be checked. Restore the file from a backup, or start a new run.") from None
    now = split_digest(get_task(cfg.model.task).federation(cfg.data, cfg.clients, cfg.seed))
    if was != now:
        data, other = cfg.data.path or "the demo data", ", other contents" if was["records"] == now["records"] else ""
        raise ConfigError(f"{data}, as read and split now ({now['records']} records), is not what {run.path} "
                          f"started on ({was['records']} records{other}): resumed on it, records would move "
                          "between the held-out split and the clients, and between clients. Restore the data as "
                          "it was (and the fedtune version that read it), or start a new run on it.")


def continue_run(path: Path, rounds: int | None = None, ray_address: str | None = None,
                 engine: str | None = SIMULATE) -> tuple[FedtuneConfig, RunDirectory]:
    """Reopen a run directory with its saved config (only RESUMABLE options may change); a damaged
    checkpoint with none to fall back to, or a damaged ledger, stops here before anything is rewritten.
    `engine`: the command continuing it, which must be the one that made it (None: the ServerApp of any
    command, reopening the run it was started for)."""
    from fedtune.config import dump_config
    from fedtune.durable import write_text_atomic

    run = RunDirectory.existing(path)
    if engine is not None and run.engine != engine:
        raise ConfigError(f"{path} is not a `{engine}` run: {run.how_to_continue()}. Continued by `{engine}`, its "
                          "clients would be others, under other names and state directories, each starting from "
                          "ε = 0.")
    _ = run.run_id  # a lost id of a run that spent stops here, before anything is rewritten
    cfg = run.config().with_overrides({"rounds": rounds, "simulation.ray_address": ray_address})
    if cfg.out and Path(cfg.out).resolve() != run.path.resolve():  # moved, or resumed from elsewhere: the
        cfg = cfg.with_overrides({"out": str(run.path.resolve())})  # ServerApp must open this directory
    latest, _ = run.resume_point()
    if latest is not None and cfg.rounds < latest.round:
        raise ConfigError(f"{path} has already finished {latest.round} rounds, so `rounds` = {cfg.rounds} would "
                          f"leave its checkpoints past the end. Give --rounds {latest.round} or more, or none.")
    ledger = run.read_ledger()
    preflight(cfg)
    _check_data_unchanged(cfg, run)
    if latest is not None and ledger is not None and cfg.rounds > latest.round:
        _check_budget_left(cfg, run.ledger_to_resume(latest), path, latest.round, run.engine)
    with run.served():  # a run another server is serving keeps its config (its `rounds`) as it is
        write_text_atomic(run.path / CONFIG, dump_config(cfg))
    return cfg, run


def _check_budget_left(cfg: FedtuneConfig, ledger, path: Path, done: int, engine: str = SIMULATE) -> None:
    """Refuse to continue a run in which every client has spent its privacy budget: each would decline
    every round left, and the run would go on training nothing. Each client's next round is judged as the
    client judges it (client/app.py): the σ it kept from its first round, its spending on the ledger,
    and its budget capped by the target ε."""
    import math

    from fedtune.privacy.budget import client_dp, projected_epsilon
    from fedtune.server.audit import client_name, institution_name

    if not cfg.dp.enabled or cfg.dp.client_dp != "off":
        return
    task = get_task(cfg.model.task)
    units = train_units(task.federation(cfg.data, cfg.clients, cfg.seed), cfg.dp.unit)
    train, least, budget = cfg.train, math.inf, math.inf
    for site, n in enumerate(units):
        spent = ledger.spent(institution_name(site) if engine == DEPLOY_LOCAL else client_name(site))
        kept = spent[-1][0] if spent and cfg.dp.target_epsilon > 0 and not cfg.dp.distributed_min_honest else None
        dp = client_dp(cfg.dp, kept, n, train.batch_size, train.local_epochs, cfg.rounds_per_client(),
                       train.sample_rate)
        after = projected_epsilon(dp, spent, n, train.batch_size, train.local_epochs, train.sample_rate)
        if after <= dp.epsilon_budget:
            return
        least, budget = min(least, after), dp.epsilon_budget
    raise ConfigError(f"Every client of {path} has spent its privacy budget: one more round would take the client "
                      f"that spent least to ε {least:.2f}, above its budget of {budget:g} (dp.epsilon_budget, or "
                      f"dp.target_epsilon where that is lower). Rounds "
                      f"{done + 1}-{cfg.rounds} would train nothing. The run's adapter and privacy report stand as "
                      "they are; to train further, start a new run with a budget of its own.")


def open_run(cfg: FedtuneConfig, target: Path, pinned: frozenset[str] | None = None,
             ) -> tuple[FedtuneConfig, RunDirectory]:
    """A new run at `target`, or the run already there when `cfg` is its config (rounds aside).
    A different config is refused, naming the options that differ: continuing a run under other
    settings would mix two recipes in one model and one privacy ledger. `pinned`: as for resolve."""
    if not (target / CONFIG).is_file():
        cfg, run, _ = new_run(cfg, target, pinned, FLWR_RUN)
        return cfg, run
    saved = RunDirectory.existing(target).config().to_flat()
    # resolved at the saved number of rounds, which the private recipe's learning rate depends on
    asked = resolve(cfg.with_overrides({"out": str(target), "rounds": saved["rounds"]}), pinned).to_flat()
    changed = sorted(key for key in saved.keys() | asked.keys()
                     if key not in RESUMABLE | DERIVED and saved.get(key) != asked.get(key))
    if changed:
        raise ConfigError(f"{target} holds a run with another config ({', '.join(changed)} differ). Continue it "
                          "with its own config (only `rounds` and `simulation.ray_address` may change), or give a new "
                          "run directory (`out`).")
    run = RunDirectory.existing(target)
    recorded = (target / ENGINE).is_file()  # a run from before the engine was kept: as before, reopened
    if recorded and run.engine not in (FLWR_RUN, DEPLOY_LOCAL):  # deploy-local's ServerApp runs under flwr run
        raise ConfigError(f"{target} is not a `{FLWR_RUN}` run: {run.how_to_continue()}.")
    return continue_run(target, cfg.rounds, engine=None)
