"""The `fedtune` command: parse, build the config, call the simulation."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedtune import __version__
from fedtune.config import FedtuneConfig, load_config
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


@cli.command("privacy-report")
def privacy_report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `fedtune simulate`.")],
) -> None:
    """Write RUN_DIR/privacy_report.md, .json and .html (self-contained) and privacy_epsilon.png:
    what the run's differential privacy guarantees, per institution, and what it does not cover.
    The last line printed is the path of the Markdown report."""
    _run_guarded(lambda: _privacy_report(run_dir))


def _privacy_report(run_dir: Path) -> None:
    from fedtune.privacy.report import REPORT_HTML, build_report, headline, write_report

    report = build_report(run_dir)
    path = write_report(run_dir, report)
    console.print(f"Privacy report: {headline(report)}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"Open {run_dir / REPORT_HTML} for the full report with the ε plot.", markup=False, soft_wrap=True)
    print(path)


@cli.command("privacy-verify")
def privacy_verify(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `fedtune simulate` (or `flwr run`).")],
) -> None:
    """An auditor's check of RUN_DIR/privacy_ledger.json: every client's ε recomputed from the
    ledger's σ, q and steps with Google's dp-accounting (not Opacus, which the run used), ε never
    decreasing, δ < 1/n, q and steps consistent with n and the batch size, no budget exceeded, and
    coherent statuses. Exit 0 when all hold; otherwise exit 1 with one line per violation:
    client, round, field, expected and found."""
    _run_guarded(lambda: _privacy_verify(run_dir))


def _privacy_verify(run_dir: Path) -> None:
    from fedtune.privacy.verify import verify_run

    result = verify_run(run_dir)
    for violation in result.violations:
        print(violation.line())
    checked = f"{result.clients} clients, {result.entries} ledger entries"
    if result.passed:
        console.print(f"privacy-verify: OK ({checked}): every ε at least what dp-accounting computes from the "
                      "ledger, never decreasing, within budget; δ < 1/n; q and steps consistent.", markup=False,
                      soft_wrap=True)
        return
    console.print(f"privacy-verify: {len(result.violations)} violations in {checked}.", markup=False)
    raise typer.Exit(1)


@cli.command()
def simulate(
    config: Annotated[Path | None, Opt(help="TOML config file; options below override it.")] = None,
    clients: Annotated[int | None, Opt(help=f"Number of simulated institutions \\[default: {D.clients}].")] = None,
    rounds: Annotated[int | None, Opt(help=f"Federated rounds; with --resume, extend the run to this many \\[default: {D.rounds}].")] = None,
    clients_per_round: Annotated[int | None, Opt(help="Clients sampled to train each round (and evaluate, see strategy.fraction_evaluate) \\[default: all].")] = None,
    out: Annotated[Path | None, Opt(help="Run directory to create (default runs/<timestamp>).")] = None,
    seed: Annotated[int | None, Opt(help="Seed for data, client sampling and DP noise.")] = None,
    no_dp: Annotated[bool, Opt("--no-dp", help="Turn DP-SGD off (it is on by default).")] = False,
    resume: Annotated[Path | None, Opt(help="Continue the run in this directory from its last finished round.")] = None,
    strategy: Annotated[str | None, Opt(help=f"Aggregation: fedavg, fedprox, or a server optimizer on the mean update: fedadam, fedyogi, fedavgm (momentum) \\[default: {D.strategy.name}].")] = None,
    proximal_mu: Annotated[float | None, Opt(help=f"FedProx proximal weight mu \\[default: {D.strategy.proximal_mu}].")] = None,
    server_learning_rate: Annotated[float | None, Opt(help="fedadam, fedyogi, fedavgm: the server's step size \\[default: 0.01; fedavgm 1.0]. Their beta_1, beta_2 and tau are set in the config file (strategy section).")] = None,
    server_momentum: Annotated[float | None, Opt(help=f"fedavgm: server momentum \\[default: {D.strategy.server_momentum}].")] = None,
    robust: Annotated[str | None, Opt(help="Combine updates robustly before the strategy's step: trimmed-mean or median, per coordinate, each institution counting once \\[default: off].")] = None,
    trim_fraction: Annotated[float | None, Opt(help=f"--robust trimmed-mean: share of updates dropped at each end \\[default: {D.strategy.trim_fraction}].")] = None,
    max_update_norm: Annotated[float | None, Opt(help="Reject (and record as failed, with the reason) an update whose L2 norm, over all tensors, exceeds this \\[default: no bound].")] = None,
    noise_multiplier: Annotated[float | None, Opt(help=f"DP-SGD noise multiplier sigma \\[default: {D.dp.noise_multiplier}].")] = None,
    max_grad_norm: Annotated[float | None, Opt(help=f"DP-SGD per-sample clipping norm C \\[default: {D.dp.max_grad_norm}].")] = None,
    delta: Annotated[float | None, Opt(help=f"DP delta; must be below 1/n for every client \\[default: {D.dp.delta}].")] = None,
    accountant: Annotated[str | None, Opt(help=f"Privacy accountant: prv or rdp \\[default: {D.dp.accountant}].")] = None,
    epsilon_budget: Annotated[float | None, Opt(help="Per-client ε cap; a client declines rounds beyond it.")] = None,
    target_epsilon: Annotated[float | None, Opt(help="Instead of --noise-multiplier: each client solves for the sigma that spends this ε over all planned rounds (and caps its budget there).")] = None,
    physical_batch_size: Annotated[int | None, Opt(help="Most examples per forward/backward pass under DP-SGD (Opacus BatchMemoryManager); saves memory, same privacy \\[default: no limit].")] = None,
    client_dp: Annotated[str | None, Opt(help=f"Client-level DP on the aggregate (one institution as a whole): off, fixed or adaptive clipping of each update, Gaussian noise on the sum; works with or without --no-dp \\[default: {D.dp.client_dp}].")] = None,
    client_dp_side: Annotated[str | None, Opt(help=f"Client-level DP: clip updates on the server or in each client \\[default: {D.dp.client_dp_side}].")] = None,
    client_noise_multiplier: Annotated[float | None, Opt(help=f"Client-level DP: noise std / update clipping norm, z \\[default: {D.dp.client_noise_multiplier}].")] = None,
    client_clipping_norm: Annotated[float | None, Opt(help=f"Client-level DP: L2 bound on each update (the start value when adaptive) \\[default: {D.dp.client_clipping_norm}].")] = None,
    secagg: Annotated[bool, Opt("--secagg", help="Secure aggregation of the adapter updates (Flower SecAgg+): the server sees only their sum, each institution counting once; with --client-dp, clip on the client side. See docs/privacy.md.")] = False,
    task: Annotated[str | None, Opt(help="classification (labelled texts) or causal-lm (instruction tuning of a causal LM, loss on the answers; the built-in triage-advice demo when no --data) \\[default: classification].")] = None,
    model: Annotated[str | None, Opt(help="Base model: local dir or hub id (default: offline MiniLM-L6; causal-lm: SmolLM2-135M-Instruct).")] = None,
    max_length: Annotated[int | None, Opt(help="Tokens kept per text.")] = None,
    device: Annotated[str | None, Opt(help="cpu or cuda (one GPU per worker; bf16 autocast where the GPU supports it).")] = None,
    pooling: Annotated[str | None, Opt(help=f"What the classification head reads: cls (the model's own head) or mean (mean of the token states; sentence-embedding models such as the default, and DP on small clients) \\[default: {D.model.pooling}].")] = None,
    lora_r: Annotated[int | None, Opt(help=f"LoRA rank; with --client-ranks, the rank of the global adapter \\[default: {D.lora.r}].")] = None,
    lora_aggregation: Annotated[str | None, Opt(help=f"How LoRA factors are combined: naive (mean of A and of B), exact (mean of the updates B·A, refactored to --lora-r by truncated SVD) or ffa (A frozen at a shared random value, only B trains and travels; DP-friendly) \\[default: {D.lora.aggregation}].")] = None,
    client_ranks: Annotated[str | None, Opt(help="Heterogeneous LoRA ranks, e.g. 4,8,16: simulated client i trains rank RANKS\\[i % count] (in deployment, a node's `lora-rank` node config); each at most --lora-r \\[default: all --lora-r].")] = None,
    local_epochs: Annotated[int | None, Opt(help=f"Local passes over each client's data per round \\[default: {D.train.local_epochs}].")] = None,
    batch_size: Annotated[int | None, Opt(help=f"Expected batch size per local step \\[default: {D.train.batch_size}].")] = None,
    optimizer: Annotated[str | None, Opt(help=f"Client optimizer: adamw, or sgd for DP-SGD with few large steps \\[default: {D.train.optimizer}].")] = None,
    learning_rate: Annotated[float | None, Opt(help=f"Client learning rate (AdamW about 1e-3 to 1e-2, SGD about 0.1 to 10) \\[default: {D.train.learning_rate}].")] = None,
    lr_schedule: Annotated[str | None, Opt(help=f"Client learning rate across rounds: constant, or decayed towards zero by the last round, linear or cosine \\[default: {D.train.lr_schedule}].")] = None,
    length_buckets: Annotated[bool, Opt("--length-buckets", help="Batch texts of similar length together to pad less (with --no-dp only).")] = False,
    examples: Annotated[int | None, Opt(help=f"Size of the built-in demo dataset \\[default: {D.data.demo_examples}].")] = None,
    data: Annotated[str | None, Opt("--data", help="Your labelled texts: a .csv, .jsonl/.json, .parquet or .txt (lines) file, a directory saved with datasets' save_to_disk, or a Hugging Face hub id with --format hf; with --task causal-lm, a .jsonl of instruction records or chats (default: the demo).")] = None,
    data_format: Annotated[str | None, Opt("--format", help="csv, jsonl, parquet, lines or hf \\[default: from the suffix of --data].")] = None,
    text_column: Annotated[str | None, Opt(help=f"Column (or JSON key) with the text \\[default: {D.data.text_column}].")] = None,
    label_column: Annotated[str | None, Opt(help=f"Column (or JSON key) with the label \\[default: {D.data.label_column}].")] = None,
    separator: Annotated[str | None, Opt(help="Format lines: `text<SEP>label` a line, split on the last SEP \\[default: tab].")] = None,
    encoding: Annotated[str | None, Opt(help=f"Text encoding of the data file, e.g. latin-1 \\[default: {D.data.encoding}].")] = None,
    skip_invalid_rows: Annotated[bool, Opt("--skip-invalid-rows", help="Leave out records with an empty text or label or a malformed line (counted in the summary) instead of stopping.")] = False,
    partition: Annotated[str | None, Opt(help=f"Client data split: iid, dirichlet (over labels), shard (few labels per client) or column (one client per value of --partition-column) \\[default: {D.data.partition}].")] = None,
    alpha: Annotated[float | None, Opt(help=f"Dirichlet concentration; smaller is more non-IID \\[default: {D.data.alpha}].")] = None,
    shards_per_client: Annotated[int | None, Opt(help=f"Partition shard: label-sorted shards per client \\[default: {D.data.shards_per_client}].")] = None,
    partition_column: Annotated[str | None, Opt(help="Partition column: the column naming each record's institution, e.g. hospital_id; --clients must equal its number of distinct values.")] = None,
    test_fraction: Annotated[float | None, Opt(help=f"Share of the data held out for server-side evaluation \\[default: {D.data.test_fraction}].")] = None,
) -> None:
    """Run a federation on Flower's Simulation Engine (the built-in triage-notes demo, or with
    --task causal-lm the triage-advice instruction demo, when no data is given). The last line
    printed is the run directory."""
    overrides = {
        "clients": clients, "strategy.clients_per_round": clients_per_round, "rounds": rounds, "seed": seed, "dp.enabled": False if no_dp else None,
        "strategy.name": strategy, "strategy.proximal_mu": proximal_mu,
        "strategy.server_learning_rate": server_learning_rate, "strategy.server_momentum": server_momentum,
        "strategy.robust": robust, "strategy.trim_fraction": trim_fraction, "strategy.max_update_norm": max_update_norm,
        "dp.noise_multiplier": noise_multiplier, "dp.max_grad_norm": max_grad_norm, "dp.delta": delta,
        "dp.accountant": accountant, "dp.epsilon_budget": epsilon_budget, "dp.target_epsilon": target_epsilon,
        "dp.physical_batch_size": physical_batch_size, "dp.client_dp": client_dp, "dp.client_dp_side": client_dp_side,
        "dp.client_noise_multiplier": client_noise_multiplier, "dp.client_clipping_norm": client_clipping_norm,
        "dp.secagg": True if secagg else None, "model.task": task, "model.name_or_path": model, "model.max_length": max_length,
        "model.device": device, "model.pooling": pooling, "lora.r": lora_r, "lora.aggregation": lora_aggregation, "lora.client_ranks": client_ranks,
        "train.local_epochs": local_epochs,
        "train.batch_size": batch_size, "train.optimizer": optimizer, "train.learning_rate": learning_rate,
        "train.lr_schedule": lr_schedule, "train.length_buckets": True if length_buckets else None,
        "data.demo_examples": examples, "data.partition": partition, "data.alpha": alpha,
        "data.path": data, "data.format": data_format, "data.text_column": text_column,
        "data.label_column": label_column, "data.separator": separator, "data.encoding": encoding,
        "data.shards_per_client": shards_per_client, "data.partition_column": partition_column,
        "data.test_fraction": test_fraction, "data.skip_invalid_rows": True if skip_invalid_rows else None,
    }
    _run_guarded(lambda: _simulate(config, out, resume, overrides), simulation=True)


def _simulate(config: Path | None, out: Path | None, resume: Path | None, overrides: dict[str, Any],
              audit_hint: bool = True) -> None:
    from fedtune.server.prepare import continue_run, new_run
    from fedtune.simulation.engine import simulate

    if resume is not None:
        changed = sorted(key for key, value in overrides.items() if value is not None and key != "rounds")
        if changed or config is not None or out is not None:
            raise ConfigError(f"--resume continues a run with its saved config; only --rounds may change "
                              f"(got {', '.join(changed) or '--config/--out'}). Drop those options.")
        cfg, run = continue_run(resume, overrides["rounds"])
    else:
        cfg = load_config(config).with_overrides(overrides)
        target = out or Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        cfg, run, summary = new_run(cfg, target)  # fixes the label list for every client and evaluation
        _show_data(summary)
    noise = (f"target ε={cfg.dp.target_epsilon} per client" if cfg.dp.target_epsilon > 0
             else f"sigma={cfg.dp.noise_multiplier}")
    dp = f"{noise}, C={cfg.dp.max_grad_norm}" if cfg.dp.enabled else "off"
    client_level = ("" if cfg.dp.client_dp == "off" else f", client-level DP {cfg.dp.client_dp} ({cfg.dp.client_dp_side}) "
                    f"z={cfg.dp.client_noise_multiplier}, C={cfg.dp.client_clipping_norm}") + (", SecAgg+" if cfg.dp.secagg else "")
    robust = "" if cfg.strategy.robust == "off" else f" with robust {cfg.strategy.robust}"
    lora = (f", LoRA {cfg.lora.aggregation} r={cfg.lora.r}" if cfg.lora.aggregation != "naive" or cfg.lora.ranks() else ""
            ) + (f" (client ranks {cfg.lora.client_ranks})" if cfg.lora.ranks() else "")
    console.print(f"fedtune {__version__}: {cfg.clients} clients, {cfg.rounds} rounds, "
                  f"{cfg.strategy.name}{robust}{lora}, DP-SGD {dp}{client_level} -> {run.path}")
    simulate(cfg, run, console)
    if audit_hint and cfg.data.canaries >= 2:  # what `fedtune audit` can score
        console.print(f"This run planted {cfg.data.canaries} canaries: `fedtune audit --resume {run.path}` scores them.",
                      soft_wrap=True)  # the path unbroken, to copy
    print(run.path)


DEFAULT_CANARIES = 500  # `fedtune audit` without --canaries (and no data.canaries in the config file)


@cli.command()
def audit(
    out: Annotated[Path | None, Opt(help="Run directory to create; the audit is written into it as audit.json.")] = None,
    config: Annotated[Path | None, Opt(help="TOML config file; options below override it.")] = None,
    clients: Annotated[int | None, Opt(help=f"Number of simulated institutions \\[default: {D.clients}].")] = None,
    rounds: Annotated[int | None, Opt(help=f"Federated rounds \\[default: {D.rounds}].")] = None,
    canaries: Annotated[int | None, Opt(help=f"Canary records m: random texts with random labels (causal-lm: a random key and phrase), each put into training with probability 1/2 at a random client \\[default: {DEFAULT_CANARIES}].")] = None,
    canary_repeats: Annotated[int | None, Opt(help="Copies of each member canary in its client's data; above 1 with --no-dp only \\[default: 1].")] = None,
    no_dp: Annotated[bool, Opt("--no-dp", help="Turn DP-SGD off: the theoretical ε is then ∞.")] = False,
    noise_multiplier: Annotated[float | None, Opt(help=f"DP-SGD noise multiplier sigma \\[default: {D.dp.noise_multiplier}].")] = None,
    max_grad_norm: Annotated[float | None, Opt(help=f"DP-SGD per-sample clipping norm C \\[default: {D.dp.max_grad_norm}].")] = None,
    delta: Annotated[float | None, Opt(help=f"DP delta, for the ledger's ε and the audit's bound alike \\[default: {D.dp.delta}].")] = None,
    confidence: Annotated[float, Opt(help="Confidence of the ε lower bound: the chance that it does not overstate the true ε.")] = 0.95,
    resume: Annotated[Path | None, Opt(help="Finish an interrupted audited run in this directory (like `fedtune simulate --resume`), then audit it.")] = None,
    seed: Annotated[int | None, Opt(help="Seed for data, canaries, their membership and client sampling.")] = None,
    clients_per_round: Annotated[int | None, Opt(help="Clients sampled to train each round \\[default: all].")] = None,
    task: Annotated[str | None, Opt(help="classification or causal-lm \\[default: classification].")] = None,
    model: Annotated[str | None, Opt(help="Base model: local dir or hub id (default: the offline one for the task).")] = None,
    max_length: Annotated[int | None, Opt(help="Tokens kept per text.")] = None,
    data: Annotated[str | None, Opt("--data", help="Your data file, as for `fedtune simulate` (default: the demo).")] = None,
    examples: Annotated[int | None, Opt(help=f"Size of the built-in demo dataset \\[default: {D.data.demo_examples}].")] = None,
    local_epochs: Annotated[int | None, Opt(help=f"Local passes over each client's data per round \\[default: {D.train.local_epochs}].")] = None,
    batch_size: Annotated[int | None, Opt(help=f"Expected batch size per local step \\[default: {D.train.batch_size}].")] = None,
    learning_rate: Annotated[float | None, Opt(help=f"Client learning rate, AdamW \\[default: {D.train.learning_rate}].")] = None,
) -> None:
    """Audit the run's privacy empirically: a federation with canaries, then the one-run audit
    (Steinke, Nasr & Jagielski 2023). Each canary is scored by the final adapter's loss on it; the
    guesses give a lower bound on ε at the run's δ, with membership-inference AUC and TPR at 1% FPR.
    Writes RUN_DIR/audit.json and the privacy report. The lower bound must stay at or below the
    theoretical ε: above it signals a bug, and the command exits with status 1 (2: a bad option).
    Other options come from --config. The last line printed is the path of audit.json."""
    overrides = {
        "clients": clients, "rounds": rounds, "seed": seed, "strategy.clients_per_round": clients_per_round,
        "data.canaries": canaries, "data.canary_repeats": canary_repeats, "dp.enabled": False if no_dp else None,
        "dp.noise_multiplier": noise_multiplier, "dp.max_grad_norm": max_grad_norm, "dp.delta": delta,
        "model.task": task, "model.name_or_path": model, "model.max_length": max_length, "data.path": data,
        "data.demo_examples": examples, "train.local_epochs": local_epochs, "train.batch_size": batch_size,
        "train.learning_rate": learning_rate,
    }
    _run_guarded(lambda: _audit(config, out, resume, confidence, overrides), simulation=True)


def _audit(config: Path | None, out: Path | None, resume: Path | None, confidence: float,
           overrides: dict[str, Any]) -> None:
    from fedtune.privacy.audit import AUDIT_FILE
    from fedtune.privacy.report import write_report
    from fedtune.server.audit import run_audit
    from fedtune.server.run_dir import RunDirectory

    if not 0 < confidence < 1:
        raise ConfigError(f"Invalid option `--confidence`: {confidence} is not a probability in (0, 1); use e.g. 0.95.")
    if overrides["dp.enabled"] is False and overrides["dp.noise_multiplier"] is not None:
        raise ConfigError("--no-dp and --noise-multiplier contradict each other: pick one.")
    if (out is None) == (resume is None):
        raise ConfigError("Give --out RUN_DIR for a new audited run, or --resume RUN_DIR to finish one (not both).")
    if resume is None and overrides["data.canaries"] is None:
        overrides = {**overrides, "data.canaries": load_config(config).data.canaries or DEFAULT_CANARIES}
    if resume is None and overrides["data.canaries"] < 2:
        raise ConfigError(f"Invalid option `--canaries`: {overrides['data.canaries']} canaries cannot tell members "
                          f"from non-members; use at least 2 (the audit is tighter with hundreds, e.g. {DEFAULT_CANARIES}).")
    target = out if resume is None else resume
    _simulate(config, out, resume, overrides, audit_hint=False)
    record = run_audit(RunDirectory.existing(target), confidence)
    write_report(target)
    _show_audit(record)
    print(target / AUDIT_FILE)
    if not record["consistent"]:
        raise typer.Exit(1)


def _show_audit(record: dict[str, Any]) -> None:
    from rich.table import Table

    def number(value: Any, digits: int = 3) -> str:
        return "–" if value is None else "∞" if value == "inf" else f"{value:.{digits}f}"

    table = Table(title=f"Privacy audit (round {record['round']})", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    m, members = record["canaries"], record["canaries_in"]
    table.add_row("canaries (in / out)", f"{m} ({members} / {m - members})"
                  + (f", {record['canary_repeats']} copies each" if record["canary_repeats"] > 1 else ""))
    table.add_row("guesses (in / out)", f"{record['guesses']} ({record['guesses_in']} / {record['guesses_out']})")
    table.add_row("correct guesses", str(record["correct"]))
    table.add_row(f"ε lower bound ({record['confidence']:.0%} confidence)", number(record["epsilon_lower_bound"]))
    table.add_row(f"ε theoretical (max over institutions, δ = {record['delta']:g})", number(record["epsilon_theoretical"]))
    table.add_row("membership-inference AUC", number(record["auc"]))
    table.add_row("TPR at 1% FPR", number(record["tpr_at_fpr_0.01"]))
    console.print(table)
    if record["consistent"]:
        console.print("The lower bound is at or below the theoretical ε, as it must be.", highlight=False)
    else:
        console.print("[bold red]The lower bound is ABOVE the theoretical ε.[/bold red] No correct DP training can "
                      "do that (except with probability 1 - confidence): this signals a bug in the privacy code or "
                      "its accounting.", highlight=False)


@cli.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `fedtune simulate` (or `flwr run`).")],
    adapter: Annotated[Path | None, Opt(help="Write the PEFT adapter (and tokenizer) here: PeftModel.from_pretrained(base, OUT).")] = None,
    merged: Annotated[Path | None, Opt(help="Write the base model with the adapter merged in, in Hugging Face format: AutoModelForCausalLM (or ...ForSequenceClassification).from_pretrained(OUT).")] = None,
) -> None:
    """Export the run's latest global adapter (its last finished round). Give --adapter OUT,
    --merged OUT, or both; OUT must not exist yet. The last line printed is the last directory written."""
    _run_guarded(lambda: _export(run_dir, adapter, merged))


def _export(run_dir: Path, adapter: Path | None, merged: Path | None) -> None:
    from fedtune.export import export_run

    if adapter is None and merged is None:
        raise ConfigError("Nothing to export: give --adapter OUT (the PEFT adapter) and/or --merged OUT (a full "
                          "model in Hugging Face format).")
    for written in export_run(run_dir, adapter=adapter, merged=merged):
        console.print(f"Wrote {written}", markup=False, highlight=False, soft_wrap=True)
        last = written
    print(last)


@cli.command("deploy-local")
def deploy_local(
    nodes: Annotated[int, Opt(help="Institutions: one SuperNode each, with its own slice of the demo data.")] = 3,
    rounds: Annotated[int | None, Opt(help=f"Federated rounds (default: {D.rounds}, or the config file's).")] = None,
    out: Annotated[Path | None, Opt(help="Run directory to create (default runs/deploy-<timestamp>).")] = None,
    config: Annotated[Path | None, Opt(help="TOML config file; only options listed in pyproject.toml's tool.flwr.app.config reach the ServerApp.")] = None,
    no_dp: Annotated[bool, Opt("--no-dp", help="Ask the institutions to train without DP-SGD (each refuses if its node config says require-dp = true).")] = False,
    node_config: Annotated[list[str] | None, Opt("--node-config", help="KEY=VALUE handed to every SuperNode's node config (repeatable), e.g. require-dp=true, epsilon-budget=8, max-delta=1e-5, min-noise-multiplier=0.8, allow-reproducible-noise=false, adopt-ledger-spending=true: each institution's own privacy policy, which the server's run config cannot weaken. Values are TOML (strings may be bare).")] = None,
    timeout: Annotated[float, Opt(help="Stop everything if the run has not finished after this many seconds.")] = 7200.0,
) -> None:
    """Run a federation on Flower's Deployment Engine on this machine: a SuperLink and one SuperNode
    per institution on 127.0.0.1, TLS on every connection, only registered SuperNodes admitted;
    the run is submitted with `flwr run`. Every process is stopped afterwards, also on failure and
    Ctrl-C. The institutions' keys, state and logs are in RUN_DIR/deployment/; docs/deployment.md
    shows the same steps across machines. The last line printed is the run directory."""
    from fedtune.deploy.run import deploy_local as run_deployment
    from fedtune.deploy.run import parse_node_config

    try:
        extra = parse_node_config(node_config or [])
    except FedtuneError as err:
        console.print(f"[bold red]Error:[/bold red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from None
    run_dir, status = run_deployment(nodes, rounds, out, config, timeout, console, node_config=extra, no_dp=no_dp)
    if run_dir is not None:
        print(run_dir)
    raise typer.Exit(status)


def _show_data(summary: dict[str, Any]) -> None:
    from rich.markup import escape

    from fedtune.data.summary import summary_lines

    lines, warnings = summary_lines(summary)
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for warning in warnings:
        console.print(f"[yellow]Warning:[/yellow] {escape(warning)}", soft_wrap=True)


def _run_guarded(action, simulation: bool = False) -> None:
    """User errors print one paragraph and exit 2; an interrupt says how to resume.

    `simulation`: after Ctrl-C the process ends at once (os._exit) once the message is out. By then
    the ServerApp has returned and every durable file is written (simulation/engine.py waits for
    it), but flwr 1.42's Simulation Engine leaves a worker thread blocked in ray.get on the Ray it
    has shut down, and Python would wait for that thread at exit forever."""
    try:
        action()
    except FedtuneError as err:
        console.print(f"[bold red]Error:[/bold red] {err}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("Interrupted. Finished rounds are saved; continue with `fedtune simulate --resume RUN_DIR`.")
        if simulation:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise typer.Exit(130) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
