"""The `fedtune` command: parse, build the config, call the simulation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedtune import __version__
from fedtune.config import FedtuneConfig, dump_config, load_config
from fedtune.durable import write_text_atomic
from fedtune.errors import ConfigError, FedtuneError

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Federated, differentially private LoRA fine-tuning on Flower, peft and Opacus.",
)
console = Console(stderr=True)

Opt = typer.Option
D = FedtuneConfig()  # shown as defaults in --help; the config file, then options, override them


@cli.command()
def version() -> None:
    """Print the fedtune version."""
    print(__version__)


@cli.command()
def simulate(
    config: Annotated[Path | None, Opt(help="TOML config file; options below override it.")] = None,
    clients: Annotated[int | None, Opt(help=f"Number of simulated institutions [default: {D.clients}].")] = None,
    rounds: Annotated[int | None, Opt(help=f"Federated rounds; with --resume, extend the run to this many [default: {D.rounds}].")] = None,
    out: Annotated[Path | None, Opt(help="Run directory to create (default runs/<timestamp>).")] = None,
    seed: Annotated[int | None, Opt(help="Seed for data, client sampling and DP noise.")] = None,
    no_dp: Annotated[bool, Opt("--no-dp", help="Turn DP-SGD off (it is on by default).")] = False,
    resume: Annotated[Path | None, Opt(help="Continue the run in this directory from its last finished round.")] = None,
    strategy: Annotated[str | None, Opt(help=f"Aggregation: fedavg or fedprox [default: {D.strategy.name}].")] = None,
    proximal_mu: Annotated[float | None, Opt(help=f"FedProx proximal weight mu [default: {D.strategy.proximal_mu}].")] = None,
    noise_multiplier: Annotated[float | None, Opt(help=f"DP-SGD noise multiplier sigma [default: {D.dp.noise_multiplier}].")] = None,
    max_grad_norm: Annotated[float | None, Opt(help=f"DP-SGD per-sample clipping norm C [default: {D.dp.max_grad_norm}].")] = None,
    delta: Annotated[float | None, Opt(help=f"DP delta; must be below 1/n for every client [default: {D.dp.delta}].")] = None,
    accountant: Annotated[str | None, Opt(help=f"Privacy accountant: prv or rdp [default: {D.dp.accountant}].")] = None,
    epsilon_budget: Annotated[float | None, Opt(help="Per-client ε cap; a client declines rounds beyond it.")] = None,
    model: Annotated[str | None, Opt(help="Base model: local dir or hub id (default: offline MiniLM-L6).")] = None,
    max_length: Annotated[int | None, Opt(help="Tokens kept per text.")] = None,
    device: Annotated[str | None, Opt(help="cpu or cuda.")] = None,
    lora_r: Annotated[int | None, Opt(help=f"LoRA rank [default: {D.lora.r}].")] = None,
    local_epochs: Annotated[int | None, Opt(help=f"Local passes over each client's data per round [default: {D.train.local_epochs}].")] = None,
    batch_size: Annotated[int | None, Opt(help=f"Expected batch size per local step [default: {D.train.batch_size}].")] = None,
    learning_rate: Annotated[float | None, Opt(help=f"Client learning rate, AdamW [default: {D.train.learning_rate}].")] = None,
    examples: Annotated[int | None, Opt(help=f"Size of the built-in demo dataset [default: {D.data.demo_examples}].")] = None,
    partition: Annotated[str | None, Opt(help=f"Client data split: iid or dirichlet [default: {D.data.partition}].")] = None,
    alpha: Annotated[float | None, Opt(help=f"Dirichlet concentration; smaller is more non-IID [default: {D.data.alpha}].")] = None,
) -> None:
    """Run a federation on Flower's Simulation Engine (the built-in triage-notes demo when no
    data is given). The last line printed is the run directory."""
    overrides = {
        "clients": clients, "rounds": rounds, "seed": seed, "dp.enabled": False if no_dp else None,
        "strategy.name": strategy, "strategy.proximal_mu": proximal_mu,
        "dp.noise_multiplier": noise_multiplier, "dp.max_grad_norm": max_grad_norm, "dp.delta": delta,
        "dp.accountant": accountant, "dp.epsilon_budget": epsilon_budget, "model.name_or_path": model, "model.max_length": max_length,
        "model.device": device, "lora.r": lora_r, "train.local_epochs": local_epochs,
        "train.batch_size": batch_size, "train.learning_rate": learning_rate,
        "data.demo_examples": examples, "data.partition": partition, "data.alpha": alpha,
    }
    _run_guarded(lambda: _simulate(config, out, resume, overrides))


def _simulate(config: Path | None, out: Path | None, resume: Path | None, overrides: dict[str, Any]) -> None:
    from fedtune.server.run_dir import CONFIG, RunDirectory
    from fedtune.simulation.engine import preflight, simulate

    if resume is not None:
        run = RunDirectory.existing(resume)
        changed = sorted(key for key, value in overrides.items() if value is not None and key != "rounds")
        if changed or config is not None or out is not None:
            raise ConfigError(f"--resume continues a run with its saved config; only --rounds may change "
                              f"(got {', '.join(changed) or '--config/--out'}). Drop those options.")
        cfg = run.config().with_overrides({"rounds": overrides["rounds"]})
        preflight(cfg)
        write_text_atomic(run.path / CONFIG, dump_config(cfg))
    else:
        cfg = load_config(config).with_overrides(overrides)
        target = out or Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        cfg = cfg.with_overrides({"out": str(target)})
        preflight(cfg)
        run = RunDirectory.create(target, cfg)
    dp = "off" if not cfg.dp.enabled else f"sigma={cfg.dp.noise_multiplier}, C={cfg.dp.max_grad_norm}"
    console.print(f"fedtune {__version__}: {cfg.clients} clients, {cfg.rounds} rounds, "
                  f"{cfg.strategy.name}, DP-SGD {dp} -> {run.path}")
    simulate(cfg, run, console)
    print(run.path)


def _run_guarded(action) -> None:
    """User errors print one paragraph and exit 2; an interrupt says how to resume."""
    try:
        action()
    except FedtuneError as err:
        console.print(f"[bold red]Error:[/bold red] {err}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("Interrupted. Finished rounds are saved; continue with `fedtune simulate --resume RUN_DIR`.")
        raise typer.Exit(130) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
