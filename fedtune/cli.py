"""The `fedtune` command: parse, build the config, call the simulation."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedtune import __version__
from fedtune.config import given_keys, load_config, read_run_config
from fedtune.errors import ClusterUnreachable, ConfigError, FedtuneError
from fedtune.options import AUDIT, DEPLOY, FLAGS_OF_KEYS, SIMULATE, config_options, explain, overrides

if TYPE_CHECKING:
    from fedtune.privacy.report import ReportData

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,  # a traceback must never print local values (keys, paths, data)
    help="Federated, differentially private LoRA fine-tuning on Flower, peft and Opacus.",
)
console = Console(stderr=True)

Opt = typer.Option


@cli.command()
def version() -> None:
    """Print the fedtune version."""
    print(__version__)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@cli.callback()
def _options(
    version: Annotated[bool, Opt("--version", callback=_print_version, is_eager=True,
                                 help="Print the fedtune version and exit.")] = False,
) -> None:
    """Federated, differentially private LoRA fine-tuning on Flower, peft and Opacus."""


@cli.command("privacy-report", short_help="Write the privacy report of a run: ε per institution, what it covers, and the plot.")
def privacy_report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `fedtune simulate`.")],
) -> None:
    """Write RUN_DIR/privacy_report.md, .json and .html (self-contained) and privacy_epsilon.png:
    what the run's differential privacy guarantees, per institution, and what it does not cover.
    The last line printed is the path of the Markdown report."""
    _run_guarded(lambda: _privacy_report(run_dir))


def _privacy_report(run_dir: Path) -> None:
    from fedtune.privacy.report import REPORT_HTML, REPORT_MD, headline
    from fedtune.quiet import quiet_warnings

    quiet_warnings()
    report = _write_report(run_dir)
    if report.settings.config_error is not None:
        console.print(f"Warning: {run_dir / 'config.toml'} could not be read ({report.settings.config_error}). The "
                      "report leaves the run's settings, its ε budget and its target ε unknown, and "
                      "`fedtune privacy-verify` cannot check this run.", style="yellow", markup=False,
                      highlight=False, soft_wrap=True)
    console.print(f"Privacy report: {headline(report)}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"Open {run_dir / REPORT_HTML} for the full report with the ε plot.", markup=False, soft_wrap=True)
    print(run_dir / REPORT_MD)


def _write_report(run_dir: Path) -> ReportData:
    """Build RUN_DIR's privacy report and write its four files, each atomically; all are rendered
    before any is written, so a failure leaves the old report whole. Returns its numbers."""
    from fedtune.durable import write_bytes_atomic, write_json_atomic, write_text_atomic
    from fedtune.privacy.report import PLOT_PNG, REPORT_HTML, REPORT_JSON, REPORT_MD, build_report, report_contents

    report = build_report(run_dir, _run_finished(run_dir))
    contents = report_contents(report)
    write_bytes_atomic(run_dir / PLOT_PNG, contents.png)
    write_json_atomic(run_dir / REPORT_JSON, report.to_dict())
    write_text_atomic(run_dir / REPORT_HTML, contents.html)
    write_text_atomic(run_dir / REPORT_MD, contents.markdown)
    return report


def _run_finished(run_dir: Path) -> bool | None:
    """Whether RUN_DIR's run has finished (RunDirectory.finished); None when that cannot be read."""
    from fedtune.server.run_dir import RunDirectory

    try:
        run = RunDirectory.existing(run_dir)
        return run.finished(run.latest_checkpoint(), read_run_config(run_dir))
    except FedtuneError:
        return None


@cli.command("privacy-verify", short_help="Recheck a run's privacy ledger with an independent accountant (dp-accounting).")
def privacy_verify(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `fedtune simulate` (or `flwr run`).")],
) -> None:
    """An auditor's check of RUN_DIR/privacy_ledger.json: every client's ε recomputed from the
    ledger's σ, q and steps with Google's dp-accounting (not Opacus, which the run used; for distributed
    DP's `skellam` ledgers a second RDP implementation, converted to ε by dp-accounting), ε never
    decreasing, δ < 1/n, q and steps consistent with n and the batch size, no budget exceeded, and
    coherent statuses. Exit 0 when all hold; exit 1 with one line per violation (client, round, field,
    expected and found); exit 2 when the ledger or config.toml cannot be read."""
    _run_guarded(lambda: _privacy_verify(run_dir))


def _privacy_verify(run_dir: Path) -> None:
    from fedtune.privacy.verify import verify_run
    from fedtune.quiet import quiet_warnings

    quiet_warnings()
    result = verify_run(run_dir)
    if _run_finished(run_dir) is False:
        console.print("Note: this run has not finished, so its ledger may lack the spending of the round under way "
                      "or the one it stopped in (the institutions' own ledger copies hold it; a resumed run records "
                      "it).", style="yellow",
                      markup=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"Note: {note}", style="yellow", markup=False, soft_wrap=True)
    for violation in result.violations:
        print(violation.line())
    checked = f"{result.clients} clients, {result.entries} ledger entries"
    if result.passed:
        console.print(f"privacy-verify: OK ({checked}): every ε at least its independent recomputation from the "
                      "ledger (dp-accounting; privacy/independent.py), never decreasing, within budget; δ < 1/n; "
                      "q and steps consistent.", markup=False, soft_wrap=True)
        return
    console.print(f"privacy-verify: {len(result.violations)} violations in {checked}.", markup=False)
    raise typer.Exit(1)


@cli.command(short_help="Run a federation on Flower's Simulation Engine (demo data, or --data).")
@config_options(SIMULATE)
def simulate(
    config: Annotated[Path | None, Opt(help="TOML config file; options below override it.")] = None,
    out: Annotated[Path | None, Opt(help="Run directory to create (default runs/<timestamp>).")] = None,
    resume: Annotated[Path | None, Opt(help="Continue the run in this directory from its last finished round; only --rounds (to extend it) and --ray-address may change.")] = None,
    **options: Any,
) -> None:
    """Run a federation on Flower's Simulation Engine (the built-in triage-notes demo, or with
    --task causal-lm the triage-advice instruction demo, when no data is given). The last line
    printed is the run directory. Every option below is also a key of the config file, e.g.
    --delta is `delta` in its \\[dp] table (dp.delta); an option named otherwise shows its key, e.g. --privacy-unit
    \\[config: dp.unit]. With --recipe auto (the default), options you leave out are chosen for the data, the
    federation and the privacy budget (docs/recipe.md; config.toml records each choice and why), so a run
    need not use the defaults shown below: under DP for ε and, for a classifier, LoRA, pooling, optimizer,
    learning rate and rounds; without DP, for a classifier, the batch size and, with several clients, 40
    rounds with a cosine schedule and early stopping with a cooldown."""
    _run_guarded(lambda: _simulate(config, out, resume, overrides(options)), simulation=True)


def _simulate(config: Path | None, out: Path | None, resume: Path | None, overrides: dict[str, Any],
              audit_hint: bool = True) -> None:
    from fedtune.server.prepare import RESUMABLE, continue_run, new_run
    from fedtune.server.run_dir import finished_as
    from fedtune.simulation.engine import check_cluster, simulate

    check_cluster(overrides.get("simulation.ray_address") or (load_config(config, overrides).simulation.ray_address
                                                               if resume is None else ""))  # before any file
    if resume is not None:
        changed = sorted(key for key, value in overrides.items() if value is not None and key not in RESUMABLE)
        if changed or config is not None or out is not None:
            may = "--rounds and --ray-address" if "simulation.ray_address" in overrides else "--rounds"
            given = [FLAGS_OF_KEYS.get(key, key) for key in changed]
            raise ConfigError(f"--resume continues a run with its saved config; only {may} may change (got "
                              f"{', '.join(given) or '--config/--out'}). Drop those options.")
        cfg, run = continue_run(resume, overrides["rounds"], overrides.get("simulation.ray_address"))
        latest = run.latest_checkpoint()
        if run.finished(latest, cfg):  # no simulation to start (Ray takes seconds)
            console.print(f"{run.path} {finished_as(latest.round, cfg.rounds)}; nothing to resume.", soft_wrap=True,
                          markup=False, highlight=False)
            print(run.path)
            return
    else:
        cfg = load_config(config, overrides)
        target = out or Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        target_existed = target.exists()  # an empty directory the user made: emptied, not removed, on a failure
        # fixes the label list for every client and evaluation, and the recipe's choices
        cfg, run, summary = new_run(cfg, target, given_keys(config, overrides))
        _show_data(summary)
        if cfg.recipe.chosen:  # the reasons are in config.toml's recipe.chosen
            which = "Private recipe" if cfg.dp.enabled else "Recipe without DP"
            console.print(f"{which} (docs/recipe.md; why each: recipe.chosen in config.toml): "
                          + ", ".join(note.split(":", 1)[0] for note in cfg.recipe.chosen), highlight=False,
                          markup=False)  # a list such as [layer.5.attention.self.query] is not rich markup
        for note in cfg.recipe.advice:  # also in config.toml's recipe.advice
            console.print(f"Note: {note}", style="yellow", highlight=False, markup=False)
    noise = (f"target ε={cfg.dp.target_epsilon} per client" if cfg.dp.target_epsilon > 0
             else f"sigma={cfg.dp.noise_multiplier}")
    dp = f"{noise}, C={cfg.dp.max_grad_norm}" if cfg.dp.enabled else "off"
    client_level = ("" if cfg.dp.client_dp == "off" else f", client-level DP {cfg.dp.client_dp} ({cfg.dp.client_dp_side}) "
                    f"z={cfg.dp.client_noise_multiplier}, C={cfg.dp.client_clipping_norm}") + (", SecAgg+" if cfg.dp.secagg else "")
    robust = "" if cfg.strategy.robust == "off" else f" with robust {cfg.strategy.robust}"
    lora = (f", LoRA {cfg.lora.aggregation} r={cfg.lora.r}" if cfg.lora.aggregation != "naive" or cfg.lora.ranks() else ""
            ) + (f" (client ranks {cfg.lora.client_ranks})" if cfg.lora.ranks() else "")
    console.print(f"fedtune {__version__}: {cfg.clients} clients, {cfg.rounds} round{'s' if cfg.rounds != 1 else ''}, "
                  f"{cfg.strategy.name}{robust}{lora}, DP-SGD {dp}{client_level} -> {run.path}")
    try:
        simulate(cfg, run, console)
    except ClusterUnreachable:  # `auto` finding no cluster: only Ray itself can tell, once the run is made
        if resume is None:  # nothing ran: leave nothing behind that would refuse a retry as "not empty"
            for path in (list(run.path.iterdir()) if target_existed else [run.path]):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
    planted = max(cfg.data.canaries, cfg.dp.canary_clients)  # what `fedtune audit` can score
    if audit_hint and planted >= 2:
        what = "canary institutions" if cfg.dp.canary_clients else "canaries"
        console.print(f"This run planted {planted} {what}: `fedtune audit --resume {run.path}` scores them.",
                      soft_wrap=True)  # the path unbroken, to copy
    print(run.path)


DEFAULT_CANARIES = 500  # `fedtune audit` without --canaries (and no data.canaries in the config file)


class Vantage(StrEnum):
    final = "final"
    server = "server"


@cli.command(short_help="Measure privacy empirically: a run with canaries, then a one-run audit.")
@config_options(AUDIT)
def audit(
    out: Annotated[Path | None, Opt(help="Run directory to create; the audit is written into it as audit.json.")] = None,
    config: Annotated[Path | None, Opt(help="TOML config file; options below override it.")] = None,
    canaries: Annotated[int | None, Opt(help=f"Canary records m: random texts with random labels (causal-lm: a random key and phrase), each put into training with probability 1/2 at a random client; under --privacy-unit user each is a canary user, its --canary-repeats copies sharing one id \\[default: data.canaries of --config, else {DEFAULT_CANARIES}].")] = None,
    confidence: Annotated[float, Opt(help="Confidence of the ε lower bound: the chance that it does not overstate the true ε.")] = 0.95,
    resume: Annotated[Path | None, Opt(help="Finish an interrupted audited run in this directory (like `fedtune simulate --resume`), then audit it.")] = None,
    vantage: Annotated[Vantage, Opt(help="Whose view the auditor takes. `final`: the final global adapter, scored by its loss on each canary (what anyone given the model sees). `server`: every update the server received, in every round, each scored along the canary's own gradient direction (what the coordinator sees without SecAgg+).")] = Vantage.final,
    **options: Any,
) -> None:
    """Audit the run's privacy empirically: a federation with canaries, then the one-run audit
    (Steinke, Nasr & Jagielski 2023). Each canary is scored by the final adapter's loss on it, or
    (--vantage server) by every round's update of its institution as the server received it; the
    guesses give a lower bound on ε at the run's δ, with membership-inference AUC and TPR at 1% FPR.
    Under --vantage server the canaries are gradient canaries (each one's gradient is 10·C along a random
    direction, which DP-SGD clips to C) unless --canary-kind or --config says otherwise.
    With --canary-clients K (and --client-dp), K canary institutions audit client-level DP instead:
    each sends a random direction at the clipping norm, is scored by its cosine with the final
    adapter's change, and Andrew et al.'s (2024) one-shot ε estimate is shown too.
    Writes RUN_DIR/audit.json and the privacy report. The lower bound must stay at or below the
    theoretical ε: above it signals a bug, and the command exits with status 1 (2: a bad option).
    Other options come from --config. The last line printed is the path of audit.json."""
    given = {**overrides(options), "data.canaries": canaries}
    _run_guarded(lambda: _audit(config, out, resume, confidence, given, vantage.value), simulation=True)


def _audit(config: Path | None, out: Path | None, resume: Path | None, confidence: float,
           overrides: dict[str, Any], vantage: str = "final") -> None:
    from fedtune.privacy.audit import AUDIT_FILE
    from fedtune.server.audit import run_audit
    from fedtune.server.run_dir import RunDirectory

    if not 0 < confidence < 1:
        raise ConfigError(f"Invalid option `--confidence`: {confidence} is not a probability in (0, 1); use e.g. 0.95.")
    if overrides["dp.enabled"] is False and overrides["dp.noise_multiplier"] is not None:
        raise ConfigError("--no-dp and --noise-multiplier contradict each other: pick one.")
    if (out is None) == (resume is None):
        raise ConfigError("Give --out RUN_DIR for a new audited run, or --resume RUN_DIR to finish one (not both).")
    canary_clients = resume is None and load_config(config, {**overrides, "data.canaries": 0}).dp.canary_clients
    if canary_clients and vantage != "final":
        raise ConfigError("--canary-clients audits client-level DP on the released global adapter; drop --vantage "
                          "server (it scores canary records, --canaries, in the updates the server received).")
    if canary_clients and canary_clients < 2:
        raise ConfigError(f"Invalid option `--canary-clients`: {canary_clients} canary institutions cannot tell "
                          f"members from non-members; use at least 2 (the audit is tighter with hundreds).")
    if resume is None and overrides["data.canaries"] is None:
        overrides = {**overrides, "data.canaries": 0 if canary_clients else
                     load_config(config, overrides).data.canaries or DEFAULT_CANARIES}
    if resume is None and vantage == "server" and "data.canary_kind" not in given_keys(config, overrides):
        # The server's view tests DP-SGD itself: a canary whose gradient is C along a direction ordinary
        # data hardly moves is close to the worst case the guarantee must cover (docs/privacy.md). A
        # user-level or mixed-rank run cannot hold one, and keeps input canaries.
        planned = load_config(config, overrides)
        if planned.dp.unit == "record" and not planned.lora.ranks():
            overrides = {**overrides, "data.canary_kind": "gradient"}
    if resume is None and not canary_clients and overrides["data.canaries"] < 2:
        raise ConfigError(f"Invalid option `--canaries`: {overrides['data.canaries']} canaries cannot tell members "
                          f"from non-members; use at least 2 (the audit is tighter with hundreds, e.g. {DEFAULT_CANARIES}).")
    target = out if resume is None else resume
    if resume is not None:  # before resuming anything: a run without canaries has nothing to audit
        planned = read_run_config(resume)
        if planned.data.canaries < 2 and not planned.dp.canary_clients:
            raise ConfigError(f"{resume} has no canaries (data.canaries = {planned.data.canaries}), so there is "
                              "nothing to audit. Start an audited run with `fedtune audit --canaries M --out RUN_DIR`.")
    planned = read_run_config(resume) if resume is not None else load_config(config, overrides)
    if vantage == "server" and planned.dp.reproducible_noise:  # before training: run_audit would refuse after it
        raise ConfigError("--vantage server audits the updates the server saw, but dp.reproducible_noise lets the "
                          "server regenerate every institution's noise, so no ε protects them; audit the released "
                          "adapter (--vantage final) or run without dp.reproducible_noise.")
    _simulate(config, out, resume, overrides, audit_hint=False)
    record = run_audit(RunDirectory.existing(target), confidence, vantage)
    _write_report(target)
    _show_audit(record)
    print(target / AUDIT_FILE)
    if not record["consistent"]:
        raise typer.Exit(1)


def _show_audit(record: dict[str, Any]) -> None:
    from rich.table import Table

    def number(value: Any, digits: int = 3) -> str:
        return "–" if value is None else "∞" if value == "inf" else f"{value:.{digits}f}"

    seen = "every update the server received" if record.get("vantage") == "server" else "the final adapter"
    table = Table(title=f"Privacy audit of {seen} (round {record['round']})", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    m, members = record["canaries"], record["canaries_in"]
    what = {"user": "canary users", "client": "canary institutions"}.get(record.get("unit"), "canaries")
    table.add_row(f"{what} (in / out)", f"{m} ({members} / {m - members})"
                  + (f", {record['canary_repeats']} copies each" if record["canary_repeats"] > 1 else ""))
    table.add_row("guesses (in / out)", f"{record['guesses']} ({record['guesses_in']} / {record['guesses_out']})")
    table.add_row("correct guesses", str(record["correct"]))
    table.add_row(f"ε lower bound ({record['confidence']:.0%} confidence)", number(record["epsilon_lower_bound"]))
    whose = "one institution as a whole" if record.get("unit") == "client" else "max over institutions"
    table.add_row(f"ε theoretical ({record.get('unit', 'record')}-level, {whose}, δ = {record['delta']:g})",
                  number(record["epsilon_theoretical"]))
    holders = record.get("epsilon_by_institution") or {}
    if holders:
        spent = [h["epsilon"] for h in holders.values()]
        low, high = (number(min(spent, key=_inf_last), 2), number(max(spent, key=_inf_last), 2))
        table.add_row(f"ε of the {len(holders)} institutions holding canaries (audit.json: epsilon_by_institution)",
                      low if low == high else f"{low}–{high}")
    table.add_row("largest bound this audit could show (every guess right)", number(record["epsilon_largest_certifiable"]))
    if record.get("unit") == "client":
        low_high = record["epsilon_estimate_interval"]
        table.add_row("ε estimate (Andrew et al. 2024; Gaussian fit, not a bound)", number(record["epsilon_estimate"])
                      + ("" if low_high is None else f" ({number(low_high[0], 2)}–{number(low_high[1], 2)})"))
    table.add_row("membership-inference AUC", number(record["auc"]))
    table.add_row("TPR at 1% FPR", number(record["tpr_at_fpr_0.01"]))
    console.print(table)
    console.print(_audit_power(record), highlight=False)
    if record["consistent"]:
        console.print("The lower bound is at or below the theoretical ε, as it must be.", highlight=False)
    else:
        console.print("[bold red]The lower bound is ABOVE the theoretical ε.[/bold red] No correct DP training can "
                      "do that (except with probability 1 - confidence): this signals a bug in the privacy code or "
                      "its accounting.", highlight=False)


def _inf_last(value: float | str) -> float:
    """Orders ε as JSON holds it, "inf" above every number."""
    return math.inf if value == "inf" else value


def _audit_power(record: dict[str, Any]) -> str:
    """What the audit could have seen: its largest certifiable bound against the theoretical ε."""
    ceiling, theoretical, m = record["epsilon_largest_certifiable"], record["epsilon_theoretical"], record["canaries"]
    power = (f"Power: with {m} canaries, at δ = {record['delta']:g} and {record['confidence']:.0%} confidence, no "
             f"outcome of this audit can show more than ε ≥ {ceiling:.2f}.")
    if theoretical == "inf":
        return power + " The theoretical ε is infinite here, so no bound can contradict it."
    if ceiling > theoretical:
        return power + " That is enough to reveal a leak beyond the theoretical ε."
    needed = record["canaries_to_certify_theoretical"]
    return power + (f" It could not reveal a leak between {ceiling:.2f} and the theoretical ε = {theoretical:.2f}; "
                    + (f"that takes at least {needed} canaries (--canaries)." if needed else
                       "no number of canaries can with this one-run method at this δ (its 2·m·δ term grows with m)."))


@cli.command(short_help="Export a run's global adapter as a PEFT adapter or a merged Hugging Face model.")
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory made by `fedtune simulate` (or `flwr run`).")],
    adapter: Annotated[Path | None, Opt(help="Write the PEFT adapter (and tokenizer) here: PeftModel.from_pretrained(base, OUT).")] = None,
    merged: Annotated[Path | None, Opt(help="Write the base model with the adapter merged in, in Hugging Face format: AutoModelForCausalLM (or ...ForSequenceClassification).from_pretrained(OUT); a classifier that pools by the mean (the private recipe) needs trust_remote_code=True, its pooling being written beside it as code.")] = None,
) -> None:
    """Export the global adapter the run releases: its last finished round's or, where early stopping's
    cooldown ended without lowering the clients' validation loss below that of the round it started from,
    that round's (docs/recipe.md). Give --adapter OUT, --merged OUT, or both; OUT must not exist yet. The
    last line printed is the last directory written."""
    _run_guarded(lambda: _export(run_dir, adapter, merged))


def _export(run_dir: Path, adapter: Path | None, merged: Path | None) -> None:
    from fedtune.export import export_run

    if adapter is None and merged is None:
        raise ConfigError("Nothing to export: give --adapter OUT (the PEFT adapter) and/or --merged OUT (a full "
                          "model in Hugging Face format).")
    exported = export_run(run_dir, adapter=adapter, merged=merged)
    untrained = " (the untrained starting point: no round has finished)" if exported.round == 0 else ""
    console.print(f"Exported the global adapter of round {exported.round} of {exported.rounds}{untrained}.",
                  markup=False, highlight=False, soft_wrap=True)
    for written in exported.paths:
        console.print(f"Wrote {written}", markup=False, highlight=False, soft_wrap=True)
    print(exported.paths[-1])


@cli.command("deploy-local", short_help="Run a federation on Flower's Deployment Engine on this machine (TLS, one SuperNode each).")
@config_options(DEPLOY)
def deploy_local(
    nodes: Annotated[int | None, Opt(help="Institutions: one SuperNode each, with its own slice of the run's data (--data, or the demo data). Default 3.", show_default=False)] = None,
    out: Annotated[Path | None, Opt(help="Run directory to create (default runs/deploy-<timestamp>).")] = None,
    resume: Annotated[Path | None, Opt(help="Continue the deploy-local run in this directory from its last finished round, with the same institutions, keys and privacy state; only --rounds (to extend it) and --timeout may be given.")] = None,
    config: Annotated[Path | None, Opt(help="TOML config file; options below override it.")] = None,
    node_config: Annotated[list[str] | None, Opt("--node-config", help="KEY=VALUE handed to every SuperNode's node config (repeatable), e.g. require-dp=true, epsilon-budget=8, max-delta=1e-5, min-noise-multiplier=0.8, allow-reproducible-noise=false, adopt-ledger-spending=true: each institution's own privacy policy, which the server's run config cannot weaken (--no-dp then asks, and an institution with require-dp=true refuses). Values are TOML (strings may be bare).")] = None,
    timeout: Annotated[float, Opt(help="Stop everything if the run has not finished after this many seconds (more than 0).")] = 7200.0,
    **options: Any,
) -> None:
    """Run a federation on Flower's Deployment Engine on this machine: a SuperLink and one SuperNode
    per institution on 127.0.0.1, TLS on every connection, only registered SuperNodes admitted;
    the run is submitted with `flwr run`. Every process is stopped afterwards, also on failure and
    Ctrl-C. The institutions' keys, state and logs are in RUN_DIR/deployment/; docs/deployment.md
    shows the same steps across machines. The last line printed is the run directory."""
    _run_guarded(lambda: _deploy_local(nodes, out, config, node_config or [], timeout, overrides(options), resume))


def _deploy_local(nodes: int | None, out: Path | None, config: Path | None, node_config: list[str], timeout: float,
                  overrides: dict[str, Any], resume: Path | None = None) -> None:
    from fedtune.deploy.run import deploy_local as run_deployment
    from fedtune.deploy.run import parse_node_config

    if resume is not None:
        given = [FLAGS_OF_KEYS[key] for key, value in sorted(overrides.items()) if value is not None and key != "rounds"]
        given += [flag for flag, value in (("--nodes", nodes), ("--out", out), ("--config", config),
                                           ("--node-config", node_config)) if value]
        if given:
            raise ConfigError(f"--resume continues a deploy-local run with its saved config, institutions and node "
                              f"configs; only --rounds and --timeout may be given (got {', '.join(given)}). Drop "
                              "those options. An institution changes its own policy in its node-config.toml under "
                              "RUN_DIR/deployment/.")
    extra = parse_node_config(node_config)  # a bad item: _run_guarded says so, exit 2
    run_dir, status = run_deployment(3 if nodes is None else nodes, out, config, timeout, console,
                                     node_config=extra, overrides=overrides, explain=explain, resume=resume)
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
        console.print(f"[yellow]Warning:[/yellow] {escape(explain(warning))}", soft_wrap=True)


def _run_guarded(action, simulation: bool = False) -> None:
    """User errors print one paragraph and exit 2; an interrupt says how to resume.

    `simulation`: after Ctrl-C the process ends at once (os._exit) once the message is out. By then
    the ServerApp has returned and every durable file is written (simulation/engine.py waits for
    it), but flwr 1.42's Simulation Engine leaves a worker thread blocked in ray.get on the Ray it
    has shut down, and Python would wait for that thread at exit forever."""
    try:
        action()
    except FedtuneError as err:
        console.print(f"[bold red]Error:[/bold red] {escape(explain(str(err)))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as err:  # e.g. --out under a file or on a read-only disk; writes are atomic, nothing is half-written
        where = f" {err.filename}" if err.filename else ""
        console.print(f"[bold red]Error:[/bold red] cannot use{escape(where)}: {escape(err.strerror or str(err))}. "
                      "Check the path and its permissions, and that the disk has room.", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        # a simulation's ServerApp has said what was saved and how to resume, if it had started a run directory
        console.print("Interrupted.")
        if simulation:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise typer.Exit(130) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
