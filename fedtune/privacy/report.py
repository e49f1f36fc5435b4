"""The privacy report of a run: what was guaranteed, to whom, and under which assumptions.

`build_report` turns a run directory's privacy ledger and config into plain numbers (JSON-ready;
∞ is always the string "inf", null means "not applicable"). The renderers only format those
numbers: Markdown and a self-contained HTML page share one list of sections, written for a
compliance reader first (a plain-language summary) and an engineer second (the details).
`write_report` writes privacy_report.{md,json,html} and privacy_epsilon.png atomically.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune import __version__
from fedtune import constants as k
from fedtune.config import read_run_config
from fedtune.durable import write_bytes_atomic, write_json_atomic, write_text_atomic
from fedtune.errors import FedtuneError
from fedtune.privacy.audit import AUDIT_FILE
from fedtune.privacy.ledger import LEDGER, LedgerEntry, read_ledger
from fedtune.privacy.policy import SOURCES

REPORT_MD, REPORT_JSON, REPORT_HTML, PLOT_PNG = (
    "privacy_report.md", "privacy_report.json", "privacy_report.html", "privacy_epsilon.png")
INF = "inf"
MANY_CLIENTS = 20  # above this the plot shows the max/median/min envelope and the top clients
TOP_CLIENTS = 5
DETAIL_CLIENTS = 50  # per-round tables for at most this many clients (the JSON has every entry)
EPSILON_KEYS = ("epsilon", "epsilon_rdp", "epsilon_prv")


# ---- numbers ----------------------------------------------------------------------------------
def build_report(run_dir: Path) -> dict[str, Any]:
    """Every number the report states, from RUN_DIR/privacy_ledger.json and config.toml."""
    run_dir = Path(run_dir)
    ledger = read_ledger(run_dir)
    settings = _settings(run_dir)
    dp_on, kind = ledger.dp_enabled, ledger.accountant
    entries = dict(sorted(ledger.clients.items()))
    rounds = max((e.round for rows in entries.values() for e in rows), default=0)
    delta = settings.get("delta") or next((e.delta for rows in entries.values() for e in rows if e.delta is not None),
                                          None)
    clients = [_client(name, rows, kind, dp_on, rounds, settings) for name, rows in entries.items()]
    policies = sorted({e.policy for rows in entries.values() for e in rows if e.policy})
    top = max(clients, key=lambda c: _float(c["epsilon"]), default=None)
    top = top if top and _float(top["epsilon"]) > 0 else None  # nobody spent anything: no "top" client
    budget = settings.get("epsilon_cap")  # None: config.toml unreadable, budget unknown
    return {
        "generated_by": f"fedtune {__version__}",
        "run_dir": str(run_dir.resolve()),
        "dp_enabled": dp_on,
        "unit": ledger.unit,
        "neighbouring_relation": NEIGHBOURS,
        "accountant": _accountant(kind, delta),
        "sampling": "poisson",
        "policies": policies,  # whose privacy policy the clients applied: "node config", "run config"
        "delta": delta,
        "epsilon_budget": budget,
        "target_epsilon": settings.get("target_epsilon"),
        "rounds_planned": settings.get("rounds"),
        "rounds_in_ledger": rounds,
        "epsilon_max": (top["epsilon"] if top else 0.0) if dp_on else INF,
        "epsilon_max_client": top["name"] if top and dp_on else None,
        "epsilon_max_other": (max((c["epsilon_other"] for c in clients), key=_float, default=0.0)
                              if dp_on else INF),
        "clients_declined": [c["name"] for c in clients if c["rounds_declined"]],
        "rounds_declined": sum(c["rounds_declined"] for c in clients),
        "rounds_failed": sum(c["rounds_failed"] for c in clients),
        "rounds_rejected": sum(c["rounds_rejected"] for c in clients),
        "rounds_refused": sum(c["rounds_refused"] for c in clients),
        "clients_state_lost": [c["name"] for c in clients if c["state_lost"]],
        "clients_over_budget": [c["name"] for c in clients if c["within_budget"] is False],
        "client_level": _clean(ledger.client_level, True) if ledger.client_level else None,
        "settings": settings,
        "audit": _read_audit(run_dir),  # None unless `fedtune audit` made this run
        "verification": _verification(run_dir),  # `fedtune privacy-verify`'s result
        "clients": clients,
    }


INSTITUTION_POLICY, RUN_POLICY = SOURCES[0], SOURCES[1]
NEIGHBOURS = ("add/remove one record of one institution, with that institution's record count n public: q, the "
              "number of steps and the averaging depend on n, and n is reported to the server in the clear")


def _verification(run_dir: Path) -> dict[str, Any] | None:
    """privacy/verify.py's independent check of the ledger; None when config.toml cannot be read."""
    from fedtune.privacy.verify import verify_run

    try:
        return verify_run(run_dir).to_dict()
    except FedtuneError:
        return None


def _settings(run_dir: Path) -> dict[str, Any]:
    """The run's privacy-relevant options; only `config_error` if config.toml cannot be read."""
    try:
        cfg = read_run_config(run_dir)
    except FedtuneError as err:
        return {"config_error": str(err)}
    dp = cfg.dp
    cap = min(dp.epsilon_budget, dp.target_epsilon) if dp.target_epsilon > 0 else dp.epsilon_budget
    return {
        "rounds": cfg.rounds, "clients": cfg.clients, "seed": cfg.seed, "accountant": dp.accountant,
        "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "delta": dp.delta,
        "epsilon_budget": _num(dp.epsilon_budget), "target_epsilon": dp.target_epsilon or None,
        "epsilon_cap": _num(cap),  # a client declines past it: the target ε also caps the budget
        "batch_size": cfg.train.batch_size, "local_epochs": cfg.train.local_epochs,
        "fraction_train": cfg.strategy.fraction_train, "client_dp": dp.client_dp, "secagg": dp.secagg,
        "reproducible_noise": dp.reproducible_noise,
    }


def _client(name: str, entries: tuple[LedgerEntry, ...], kind: str, dp_on: bool, rounds: int,
            settings: dict[str, Any]) -> dict[str, Any]:
    """One institution: its cumulative ε (the latest entry that carries one) and its parameters."""
    # Rounds that ran local steps: trained, trained but the update refused by the server (rejected),
    # or failed after training (fail closed); all spent.
    trained = [e for e in entries if e.steps]
    reported = [e for e in entries if e.reported]  # failed rounds report nothing
    # Stand-ins when there is no such entry: nothing reported means nothing spent, no parameters known.
    latest = reported[-1] if reported else LedgerEntry(0, "", epsilon=0.0, epsilon_other=0.0)
    last = trained[-1] if trained else LedgerEntry(0, "")
    eps = _num(latest.epsilon) if dp_on else INF
    budget = settings.get("epsilon_cap")
    params = {(e.noise_multiplier, e.max_grad_norm, e.sample_rate) for e in trained}
    committed = [e for e in entries if not e.interrupted]
    return {
        "name": name,
        "epsilon": eps,
        "epsilon_other": _num(0.0 if latest.epsilon_other is None else latest.epsilon_other) if dp_on else INF,
        "delta": settings.get("delta") if latest.delta is None else latest.delta,
        "noise_multiplier": last.noise_multiplier,
        "max_grad_norm": last.max_grad_norm,
        "sample_rate": last.sample_rate,
        "num_examples": last.num_examples,
        "expected_batch": last.num_examples * last.sample_rate if last.num_examples else None,
        "parameters_changed": len(params) > 1,
        "steps": sum(e.steps for e in trained),
        "rounds_trained": sum(e.status == k.STATUS_TRAINED for e in committed),
        "rounds_declined": sum(e.status == k.STATUS_DECLINED for e in committed),
        "rounds_failed": sum(e.status == k.STATUS_FAILED for e in committed),
        "rounds_rejected": sum(e.status == k.STATUS_REJECTED for e in committed),
        "rounds_refused": sum(e.status == k.STATUS_REFUSED for e in committed),
        "state_lost": any(e.state_lost for e in entries),
        "rounds_interrupted": len(entries) - len(committed),
        "within_budget": None if not dp_on or budget is None else _float(eps) <= _float(budget),
        "records_at_most": _records_at_most(trained, settings.get("batch_size")),
        "delta_below_1_over_n": _delta_check(trained, settings.get("batch_size"), latest.delta),
        "epsilon_by_round": _curve(reported, rounds, dp_on),
        "entries": [_clean(e.to_dict(), dp_on) for e in entries],
    }


def _records_at_most(trained: list[LedgerEntry], batch: int | None) -> int | None:
    """The largest record count the institution reported; for ledgers without it, the bound from
    the schedule (q = 1/ceil(n/B), so at most B/q records)."""
    counts = [e.num_examples for e in trained if e.num_examples]
    if counts:
        return max(counts)
    qs = [e.sample_rate for e in trained if e.sample_rate]
    return round(batch / min(qs)) if batch and qs else None


def _delta_check(trained: list[LedgerEntry], batch: int | None, delta: float | None) -> bool | None:
    """δ < 1/n for the record counts reported; for ledgers without them, from the bounds
    B(1/q - 1) < n <= B/q. None when the ledger cannot tell."""
    counts = [e.num_examples for e in trained if e.num_examples]
    if counts and delta:
        return all(delta * n < 1 for n in counts)
    qs = [e.sample_rate for e in trained if e.sample_rate]
    if not (batch and qs and delta):
        return None
    q = min(qs)
    if delta * batch / q < 1:
        return True
    if delta * (batch * (1 / q - 1) + 1) >= 1:
        return False
    return None


def _curve(reported: list[LedgerEntry], rounds: int, dp_on: bool) -> list[float | str]:
    """Cumulative ε after each round 0..rounds; a round the client sat out keeps the last value."""
    if not dp_on:
        return [INF] * (rounds + 1)
    by_round = {e.round: _num(e.epsilon) for e in reported}  # a later entry (a rerun) wins
    curve, current = [], 0.0
    for round_ in range(rounds + 1):
        current = by_round.get(round_, current)
        curve.append(current)
    return curve


def _accountant(kind: str, delta: float | None) -> dict[str, Any]:
    if kind == "prv":
        eps_error = inspect.signature(PRVAccountant.get_epsilon).parameters["eps_error"].default
        return {"name": "prv", "other": "rdp", "bound": "upper end of a numerical error interval",
                "eps_error": eps_error, "delta_error": delta / 1000 if delta else None}
    alphas = RDPAccountant.DEFAULT_ALPHAS
    return {"name": "rdp", "other": "prv", "bound": "upper bound (minimum over a finite set of Rényi orders)",
            "orders": len(alphas), "order_min": min(alphas), "order_max": max(alphas)}


def _clean(entry: dict[str, Any], dp_on: bool) -> dict[str, Any]:
    """A ledger entry with ∞ spelled "inf": the ledger writes null for an infinite ε."""
    out = {key: _num(v) for key, v in entry.items()}
    for key in EPSILON_KEYS:
        if key in out and (out[key] is None or not dp_on):
            out[key] = INF
    return out


def _num(value: Any) -> Any:
    """JSON-safe: ∞ becomes "inf", NaN becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else INF
    return value


def _float(value: float | str | None) -> float:
    return math.inf if value == INF else float(value or 0.0)


# ---- the empirical audit (fedtune audit) -------------------------------------------------------
AUDIT_KEYS = ("round", "method", "canaries", "canaries_in", "canary_repeats", "guesses", "guesses_in",
              "guesses_out", "correct", "epsilon_lower_bound", "epsilon_theoretical", "delta", "confidence",
              "hypotheses", "auc", "tpr_at_fpr_0.01", "consistent")


def _read_audit(run_dir: Path) -> dict[str, Any] | None:
    """audit.json's summary (not its per-canary lists); None when the run was not audited."""
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        return None
    try:
        audit = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedtuneError(f"{path} is not valid JSON ({err}). Run `fedtune audit` again, or remove the file.") from err
    missing = [key for key in AUDIT_KEYS if key not in audit]
    if missing:
        raise FedtuneError(f"{path} is not a fedtune audit (no {', '.join(missing)}). Run `fedtune audit` again.")
    return {key: audit[key] for key in AUDIT_KEYS}


def _audit(r: dict[str, Any]) -> list[Block]:
    a = r["audit"]
    m, members, theoretical, bound = a["canaries"], a["canaries_in"], a["epsilon_theoretical"], a["epsilon_lower_bound"]
    copies = a["canary_repeats"]
    rows = [["canaries (in training / left out)", f"{m} ({members} / {m - members})"],
            ["copies of each canary in training", str(copies)],
            ["guesses made (\"in\" / \"out\")", f"{a['guesses']} ({a['guesses_in']} / {a['guesses_out']})"],
            ["correct guesses", str(a["correct"])],
            [f"**ε lower bound** (at δ = {_g(a['delta'])}, {a['confidence']:.0%} confidence)", f"**{bound:.2f}**"],
            ["**theoretical ε** (largest of any institution)", f"**{_eps(theoretical)}**"],
            ["membership-inference AUC", _g(a["auc"])],
            ["true-positive rate at 1% false-positive rate", _g(a["tpr_at_fpr_0.01"])],
            ["guess counts tried (Bonferroni correction)", str(a["hypotheses"])]]
    blocks: list[Block] = [
        f"`fedtune audit` checked this run empirically with the one-run method of Steinke, Nasr & Jagielski (2023). "
        f"{m} canary records that occur nowhere in the real data were each put into training with probability 1/2, at "
        f"a randomly chosen institution; after round {a['round']} each canary was scored by the final global "
        f"adapter's loss on it (a lower loss: more likely trained on). The auditor guessed \"in\" for the "
        f"{a['guesses_in']} lowest losses and \"out\" for the {a['guesses_out']} highest, abstaining on the rest; "
        "how many of those guesses are right bounds ε from below.",
        Table(["audit", "value"], rows),
        "**The lower bound must stay at or below the theoretical ε.** The theoretical ε is proven to bound what any "
        "attack can learn about one record; this audit is one such attack, and its bound holds with the stated "
        "confidence. A lower bound above the theoretical ε therefore signals a bug: in the DP-SGD code, in the "
        "accounting, or in an assumption the proof relies on.",
    ]
    if theoretical == INF:
        blocks.append("Here the theoretical ε is ∞ (no DP-SGD), so any lower bound is consistent with it; the audit "
                      + (f"shows ε ≥ {bound:.2f}: this run's training records are measurably exposed."
                         if bound > 0 else "found no significant leakage, which does not show there is none."))
    elif a["consistent"]:
        blocks.append(f"Here ε ≥ {bound:.2f} was shown against a theoretical ε = {_eps(theoretical)}: consistent. "
                      "A lower bound well below the theoretical ε is expected and does not show that ε is loose: one "
                      "run and one attack reveal only part of what the guarantee covers.")
    else:
        blocks.append(f"**Here the lower bound, {bound:.2f}, is above the theoretical ε = {_eps(theoretical)}: this "
                      "signals a bug.** Do not rely on this run's privacy guarantee until it is explained.")
    if copies > 1:
        blocks.append(f"Each member canary was {copies} records (DP-SGD was off, as repeats require), so the audit "
                      "measured the exposure of a record seen that many times.")
    return blocks


# ---- plot -------------------------------------------------------------------------------------
def plot_epsilon(report: dict[str, Any]) -> bytes:
    """PNG of cumulative ε against round: a line per client, or an envelope when there are many."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    clients, rounds = report["clients"], list(range(report["rounds_in_ledger"] + 1))
    if not report["dp_enabled"]:
        ax.text(0.5, 0.5, "DP-SGD was off: no formal guarantee (ε = ∞)", ha="center", va="center",
                transform=ax.transAxes, fontsize=13)
    elif len(clients) > MANY_CLIENTS:
        curves = [[_plottable(v) for v in c["epsilon_by_round"]] for c in clients]
        by_round = list(zip(*curves, strict=True))
        ax.fill_between(rounds, [min(v) for v in by_round], [max(v) for v in by_round], alpha=0.2,
                        label=f"range over {len(clients)} institutions")
        for label, stat, style in (("max", max, "-"), ("median", statistics.median, "--"), ("min", min, ":")):
            ax.plot(rounds, [stat(v) for v in by_round], style, color="black", label=label)
        for c in sorted(clients, key=lambda c: _float(c["epsilon"]), reverse=True)[:TOP_CLIENTS]:
            ax.plot(rounds, [_plottable(v) for v in c["epsilon_by_round"]], marker=".", lw=1, label=c["name"])
    else:
        for c in clients:
            ax.plot(rounds, [_plottable(v) for v in c["epsilon_by_round"]], marker="o", label=c["name"])
    if report["dp_enabled"] and report["epsilon_budget"] not in (INF, None):
        ax.axhline(report["epsilon_budget"], color="tab:red", ls="--", label=f"budget ε = {report['epsilon_budget']:g}")
    accountant = report["accountant"]["name"].upper()
    ax.set(xlabel="round", ylabel="cumulative ε", title=f"ε per institution ({accountant}, δ = {_g(report['delta'])})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=2 if len(ax.get_legend_handles_labels()[0]) > 8 else 1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plottable(value: float | str) -> float:
    return math.nan if value == INF else value  # an infinite ε leaves a gap, it cannot be drawn


# ---- text -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Plot:
    alt: str


Block = str | list[str] | Table | Plot  # paragraph, bullet list, table, the ε plot


def headline(report: dict[str, Any]) -> str:
    """One line: the largest ε, the budget and the declines (also the CLI's summary)."""
    if not report["dp_enabled"]:
        return "DP-SGD was off: no formal privacy guarantee (ε = ∞)."
    budget = {INF: "no ε budget", None: "budget unknown"}.get(report["epsilon_budget"],
                                                             f"budget ε = {_g(report['epsilon_budget'])}")
    top = report["epsilon_max_client"]
    spent = f"max ε = {_eps(report['epsilon_max'])} ({top})" if top else "no privacy spent (ε = 0)"
    return (f"{spent} at δ = {_g(report['delta'])}, {report['accountant']['name'].upper()} accountant; {budget}; "
            f"{_count(len(report['clients_declined']), 'institution')} declined rounds.")


def _sections(r: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    return [
        ("Summary", _summary(r)),
        ("What is protected", _protected(r)),
        ("Privacy spent per institution", _spent(r)),
        ("Independent check", _independent_check(r)),
        *([("Empirical privacy audit", _audit(r))] if r.get("audit") else []),
        ("Client-level differential privacy", _client_level(r)),
        ("How ε was computed", _method(r)),
        ("What the guarantee covers", _covers(r)),
        ("What the guarantee does not cover", _not_covered(r)),
        ("Assumptions and limits", _assumptions(r)),
        ("Run settings", [_settings_table(r)]),
        ("ε per round", [Plot("Cumulative ε per institution and round")]),
        ("Per-round detail", _detail(r)),
    ]


def _summary(r: dict[str, Any]) -> list[Block]:
    n, rounds = len(r["clients"]), r["rounds_in_ledger"]
    if not r["dp_enabled"]:
        return [f"**Differential privacy was OFF for this run.** There is no formal privacy guarantee "
                f"(ε = ∞). The model updates that the {_count(n, 'institution')} sent to the server in "
                f"{_count(rounds, 'round')} were computed from their records without clipping or noise, and "
                "can reveal information about individual records."]
    unprotected = [c["name"] for c in r["clients"] if c["epsilon"] == INF]
    paragraphs = [("DP-SGD was on, but **" + ", ".join(unprotected) + " trained without noise (ε = ∞): their "
                   "records have no formal protection.** The other institutions' records" if unprotected else
                   "Each institution's records")
                  + " are protected by sample-level differential privacy (DP-SGD): adding or removing any one of "
                  "an institution's records changes the probability of any update it sent by at most a factor of "
                  "e^ε, except with probability δ" + (f" (for the largest ε here, e^ε ≈ {_ratio(r['epsilon_max'])})."
                                                     if r["epsilon_max_client"] and r["epsilon_max"] != INF else ".")
                  + " Smaller ε is stronger protection; at the ε of most deployed systems (1 to 10) the factor is "
                  "large, and the protection is against learning much about one record, not against any inference.",
                  " ".join(_facts(r)), _against_whom(r)]
    cl = r["client_level"]
    paragraphs.append(
        "Client-level differential privacy was off: the guarantee is about individual records; it does not hide "
        "whether an institution took part, nor its data as a whole." if cl is None else
        f"Client-level differential privacy was on as well: the aggregated model also hides any one institution's "
        f"whole contribution, up to ε = {_eps(cl.get('epsilon'))} at δ = {_g(cl.get('delta'))}.")
    paragraphs.append("Not covered: the record counts, training losses and evaluation results that institutions "
                      "reported to the server were sent as they are, without noise. See the sections below.")
    return paragraphs


def _against_whom(r: dict[str, Any]) -> str:
    """Against whom the guarantee holds, from the privacy policies the clients applied (ledger
    `policy`, privacy/policy.py) and the run's noise seeding."""
    if r["settings"].get("reproducible_noise", True):
        return ("**Not against the server**: the run used `dp.reproducible_noise`, noise derived from a seed the "
                "server knows, which it could regenerate and subtract; research use only. The guarantee still holds "
                "against anyone who sees only the released model.")
    policies = r["policies"]
    if policies == [INSTITUTION_POLICY]:
        return ("**Against the server**: the noise was added inside each institution before anything left it, under "
                "the privacy policy in that institution's own node config: whatever the server asked, an institution "
                "refused weaker settings (no DP, reproducible noise, δ or σ outside its limits). This holds provided "
                "each institution runs unmodified fedtune with the node config its operator set.")
    if policies == [RUN_POLICY]:
        return ("**Who set the parameters**: the institutions trained on partitions of the coordinator's own dataset "
                "(a simulation), under the run's config, so no institution enforced a policy of its own. The noise was "
                "added before any update left a client; the guarantee holds against anyone who sees the updates or "
                "the model, for the parameters recorded here.")
    if not policies:
        return ("**Against whom**: this ledger does not record whose privacy policy the clients applied (written by "
                "an older fedtune); the noise was added inside each client before anything left it.")
    return ("**Against whom**: not every client applied a policy of its own institution (see the per-round detail, "
            "policy): some followed the run's config, within whatever limits their node config set. The noise was "
            "added inside each client before anything left it; against the server, an institution is protected "
            "only as far as the limits in its own node config go.")


def _facts(r: dict[str, Any]) -> list[str]:
    """The summary's numbers in words: the largest ε, the budget, declines and failures."""
    rounds, budget = r["rounds_in_ledger"], r["epsilon_budget"]
    budget_text = {INF: "no ε budget was set", None: "the ε budget is unknown (config.toml could not be read)"}.get(
        budget, f"the budget per institution was ε = {_g(budget)}")
    top = next((c for c in r["clients"] if c["name"] == r["epsilon_max_client"]), None)
    if rounds == 0:
        facts = [f"No round has been trained yet, so no privacy was spent (ε = 0); {budget_text}."]
    elif top is None:
        facts = [f"No institution sent a model update trained on its records in {_count(rounds, 'round')}, so no "
                 f"privacy was spent (ε = 0); {budget_text}."]
    else:
        ran = top["rounds_trained"] + top["rounds_rejected"] + top["rounds_interrupted"]
        facts = [f"The institution that spent the most privacy (`{top['name']}`) reached "
                 f"ε = {_eps(r['epsilon_max'])} at δ = {_g(r['delta'])} after {_count(rounds, 'round')} "
                 f"(it trained in {ran} of them); {budget_text}."]
    if r["clients_over_budget"]:
        facts.append(f"**{_count(len(r['clients_over_budget']), 'institution')} went over the budget**: "
                     f"{', '.join(r['clients_over_budget'])}.")
    elif budget not in (INF, None) and r["clients"]:
        facts.append("Every institution stayed within the budget.")
    if r["clients_declined"]:
        facts.append(f"{_count(len(r['clients_declined']), 'institution')} declined "
                     f"{_count(r['rounds_declined'], 'round')} in total to stay within budget.")
    if r["rounds_failed"]:
        facts.append(f"{_count(r['rounds_failed'], 'training round')} failed at an institution; a failed round "
                     "sends no update.")
    if r["rounds_rejected"]:
        facts.append(f"The server refused {_count(r['rounds_rejected'], 'trained update')} (the reasons are in the "
                     "per-round detail); those rounds ran DP-SGD, so their ε counts in full.")
    return facts


def _protected(r: dict[str, Any]) -> list[Block]:
    if not r["dp_enabled"]:
        return ["Nothing is formally protected: DP-SGD was off (`dp.enabled = false`)."]
    return [[
        "**Unit of privacy**: one record (one training example) of one institution: sample-level DP. "
        f"Ledger: \"{r['unit']}\".",
        "**Neighbouring datasets**: an institution's data with one record added or removed (add/remove-one), "
        "**with its record count n treated as public**. Each institution's sampling rate q = 1/⌈n/B⌉, its number "
        "of steps and the scaling of its update follow from n, and n is sent to the server in the clear; the "
        "(ε, δ) holds between neighbouring datasets run with the recorded q and steps. Opacus' accountants analyse "
        "each DP-SGD step as a Poisson-subsampled Gaussian mechanism under this relation (RDP: Mironov, Talwar & "
        "Zhang 2019; PRV: Gopi, Lee & Wutschitz 2021). If you need *replace-one* neighbours, a replacement is a "
        "removal plus an addition, so group privacy gives (2ε, (1 + e^ε)·δ).",
        "**Each institution has its own guarantee**, from its own accounting; ε is not summed across "
        "institutions. The unit is a record, not a person: a person with several records, at one institution or "
        "at several, is protected less (composition / group privacy).",
        _against_whom(r),
    ]]


def _spent(r: dict[str, Any]) -> list[Block]:
    kind, other_kind = r["accountant"]["name"].upper(), r["accountant"]["other"].upper()
    interrupted = any(c["rounds_interrupted"] for c in r["clients"])
    rejected = any(c["rounds_rejected"] for c in r["clients"])
    refused = any(c["rounds_refused"] for c in r["clients"])
    header = ["institution", f"ε ({kind})", f"ε ({other_kind})", "δ", "σ", "C", "n", "q", "n·q", "steps",
              "trained", *(["rejected"] if rejected else []), "declined", *(["refused"] if refused else []), "failed",
              *(["interrupted"] if interrupted else []), "within budget"]
    rows = [[f"`{c['name']}`", _eps(c["epsilon"]), _eps(c["epsilon_other"]), _g(c["delta"]),
             _g(c["noise_multiplier"]) + ("*" if c["parameters_changed"] else ""), _g(c["max_grad_norm"]),
             _g(c["num_examples"]), _g(c["sample_rate"]), _g(c["expected_batch"]), str(c["steps"]),
             str(c["rounds_trained"]), *([str(c["rounds_rejected"])] if rejected else []), str(c["rounds_declined"]),
             *([str(c["rounds_refused"])] if refused else []),
             str(c["rounds_failed"]), *([str(c["rounds_interrupted"])] if interrupted else []),
             {True: "yes", False: "**no**", None: "–"}[c["within_budget"]]] for c in r["clients"]]
    if not rows:
        return ["The ledger has no entries: no round has been trained yet."]
    blocks: list[Block] = [Table(header, rows)]
    if r["dp_enabled"] and r["epsilon_max_client"]:
        blocks.append(f"**Maximum across institutions: ε = {_eps(r['epsilon_max'])}** (`{r['epsilon_max_client']}`) "
                      f"by the {kind} accountant; the largest ε by the {other_kind} accountant is "
                      f"{_eps(r['epsilon_max_other'])}.")
    blocks.append(
        "ε is cumulative: the institution's spending over every round it trained, as of its latest ledger entry. "
        "σ (noise multiplier), C (clipping norm), n (its training records) and q (sampling rate) are from its "
        "latest trained round (* where they changed between rounds: see the per-round detail); n·q is the "
        "expected size of a Poisson batch; steps are all local DP-SGD steps it ran. Declined and refused rounds "
        "train nothing and cost nothing. A failed round may have cost ε: a client that failed after training "
        "(fail closed) or whose reply came too late took its steps and saved them in its own state before "
        "replying, so its next report includes them; a client that crashed before saving released nothing from "
        "that round."
        + (" Rejected rounds were trained, but the server refused the update (too large or malformed); "
           "they cost ε like any trained round." if rejected else "")
        + (" Interrupted rounds were trained and reported, but the run crashed before the server committed "
           "them; their steps count." if interrupted else ""))
    return blocks


def _client_level(r: dict[str, Any]) -> list[Block]:
    cl = r["client_level"]
    if cl is None:
        asked = r["settings"].get("client_dp")
        note = (f" The config asked for it (`dp.client_dp = {asked}`), but the ledger holds no client-level "
                "accounting, so no client-level guarantee is claimed." if asked not in (None, "off") else "")
        return ["Client-level DP was **off**: no guarantee hides an institution's participation or its whole "
                "dataset." + note]
    return [f"Client-level DP was **on**: each institution's whole update was clipped and Gaussian noise was "
            f"added to the aggregate, so the released global model hides any one institution's participation "
            f"up to **ε = {_eps(cl.get('epsilon'))} at δ = {_g(cl.get('delta'))}**. This is central DP: the server "
            "adds the noise and is trusted with the updates it sees.",
            [f"clipping: {cl.get('clipping')} ({cl.get('side')} side), norm {_g(cl.get('clipping_norm'))}",
             f"noise multiplier: {_g(cl.get('noise_multiplier'))}",
             f"sampling of institutions: {_cohort(cl)}",
             f"rounds composed: {cl.get('rounds')}",
             f"accountant: {str(cl.get('accountant', '')).upper()}"]]


def _cohort(cl: dict[str, Any]) -> str:
    q = cl.get("sample_rate")
    if q is not None and q >= 1:
        return "every institution in every round (no amplification by sampling is claimed)"
    if cl.get("sampling") == "poisson":
        return (f"each institution joined each round by its own coin flip with probability q = {_g(q)} (Poisson "
                "sampling, which the accounting assumes; the cohort size varied)")
    return (f"rate q = {_g(q)}, by a fedtune older than Poisson sampling of institutions: it sampled a fixed number "
            "per round, for which the Poisson accounting is not a proof")


def _independent_check(r: dict[str, Any]) -> list[Block]:
    v = r["verification"]
    if v is None:
        return ["Not run: config.toml could not be read, and the check needs the run's batch size and budget."]
    intro = (f"`fedtune privacy-verify` recomputed every ε in the ledger ({v['entries']} entries of {v['clients']} "
             "institutions) from its σ, q and steps with Google's dp-accounting, an implementation independent of "
             "Opacus, and checked that no ε decreases, δ < 1/n, q and the steps match n and the batch size, no budget "
             "was exceeded and the statuses are coherent.")
    if v["passed"]:
        return [intro + " **Every check passed.**"]
    shown = [item["line"] for item in v["violations"][:20]]
    more = len(v["violations"]) - len(shown)
    return [intro + f" **It found {_count(len(v['violations']), 'violation')}; do not rely on the figures above until "
            "each is explained:**", shown + ([f"… and {more} more (`fedtune privacy-verify`)"] if more else [])]


def _method(r: dict[str, Any]) -> list[Block]:
    if not r["dp_enabled"]:
        return ["No accountant ran: DP-SGD was off, so ε is infinite."]
    a = r["accountant"]
    if a["name"] == "prv":
        accountant = (f"**PRV accountant** (Opacus `PRVAccountant`, Gopi et al. 2021). It composes the privacy-loss "
                      f"distributions of all steps numerically (FFT on a discretised domain) and returns "
                      f"`get_epsilon(δ, eps_error={a['eps_error']:g})`: the upper end of its error interval, that is "
                      f"ε computed at δ − δ/1000 (δ/1000 = {_g(a['delta_error'])}) plus {a['eps_error']:g}. By the "
                      f"method's error analysis the exact ε at δ lies inside that interval, so the reported value "
                      f"does not understate it; it overstates it by at most the interval's width, about "
                      f"{2 * a['eps_error']:g}.")
    else:
        accountant = (f"**RDP accountant** (Opacus `RDPAccountant`, Mironov et al. 2019). It adds up Rényi DP over "
                      f"all steps at {a['orders']} orders from {a['order_min']:g} to {a['order_max']:g} and converts "
                      f"to (ε, δ) at the best of them (Balle et al. 2020). The result is an upper bound, "
                      f"conservative: the true ε is lower, and the PRV figure beside it is usually tighter.")
    return [[
        accountant,
        f"**The other accountant** ({a['other'].upper()}) was run on the same history; its ε is shown beside the "
        "main one as a cross-check. Budgets and declines use the main accountant.",
        "**Composition**: each institution keeps one accountant history of (σ, q, steps) across all rounds and "
        "restarts; ε is computed from the whole history, over every local step it ran. Rounds it sat out add "
        "nothing.",
        "**Sampling**: every institution trains with Poisson sampling (Opacus' `UniformWithReplacementSampler`): "
        "each record joins each step's batch independently with probability q = 1/⌈n/B⌉, for exactly ⌈n/B⌉ steps "
        "per local epoch, the schedule the accountant and the budget forecast use. A step whose Poisson batch is "
        "empty is still taken (noise only) and counted.",
        "**Each step**: every record's gradient is clipped to L2 norm C, and Gaussian noise of standard "
        "deviation σ·C is added to their sum. All trained tensors go through it: the LoRA matrices, the "
        "classification head and the other modules trained in full (`lora.modules_to_save`).",
    ]]


def _covers(r: dict[str, Any]) -> list[Block]:
    if not r["dp_enabled"]:
        return ["Nothing: without DP-SGD there is no formal guarantee for any release."]
    return [[
        "every round's adapter update (LoRA matrices and trained head) that each institution sent to the server;",
        "by post-processing, everything computed from those updates alone: the aggregated adapter of every round, "
        "the checkpoints, the final adapter in `adapter/`, and the server's evaluation of them on its held-out data;",
        "FedProx's proximal step, which only uses the previous global adapter (post-processing).",
    ]]


def _not_covered(r: dict[str, Any]) -> list[Block]:
    return [
        "These are sent to the server as they are, without noise, and are not covered by ε:",
        [f"after training, each round: `{k.NUM_EXAMPLES}` (size of the training set), `{k.TRAIN_LOSS}` (mean "
         f"loss over the round's batches, computed from the records), `{k.STEPS}`, `{k.SAMPLE_RATE}` (which "
         f"also reveals the training-set size roughly), `{k.NOISE_MULTIPLIER}`, `{k.MAX_GRAD_NORM}`, `{k.DELTA}`, "
         f"`{k.EPSILON}`, `{k.EPSILON_OTHER}`, `{k.BYTES_UP}`, and the institution's name and status "
         "(trained or declined);",
         f"after evaluation, each round: `{k.NUM_EXAMPLES}`, `{k.EVAL_LOSS}` and `{k.EVAL_ACCURACY}` on the "
         "institution's local validation split. Validation records are never used in training, so DP-SGD gives "
         "them no protection at all;",
         f"with every reply: `{k.PEAK_RSS_MB}` and `{k.PID}` (the client process's peak memory and process id), "
         "when the reply arrived (how long the institution took to train, which grows with its data), and for a "
         "refused or failed round the reason it gave;",
         "in simulation, `partition_summary.json` and `partition.png`: each client's example count and label "
         "histogram, computed by the coordinator from the dataset it split (no institution's private data when "
         "institutions read their own files);",
         "whether an institution took part, declined or failed in each round (unless client-level DP is on, "
         "its participation is not hidden);",
         "the server's held-out data used for server-side evaluation (in simulation, the share "
         "`data.test_fraction` set aside before the data is split among institutions) is no institution's "
         "training data and is outside the guarantee; so are the public base model and its pre-training data."],
    ]


def _assumptions(r: dict[str, Any]) -> list[Block]:
    items = [
        "**δ must be well below 1/n** for an institution with n records (δ ≥ 1/n allows a mechanism that "
        f"publishes a whole record). {_delta_sentence(r)}",
        "**Composition over all local steps**: the accounting assumes each institution's history was kept "
        "through the whole run (fedtune keeps it in the client's state file and in Flower's context). A client "
        "whose state holds less than the ledger records for it refuses to train until its operator adopts the "
        "ledger's record (`adopt-ledger-spending`), and the server recomputes every reported ε from the ledger "
        "and marks a lower one `state_lost`" + (f": **{', '.join(r['clients_state_lost'])}** reported one."
                                                if r["clients_state_lost"] else "; none was."),
        "**Hyper-parameter tuning is not accounted**: if σ, C, the learning rate, the number of rounds or the "
        "budget were chosen by trying runs on the same private data, the real privacy cost is higher.",
        _randomness(r),
        "**Floating point**: the guarantee is for exact arithmetic; known floating-point attacks on the Gaussian "
        "mechanism are not mitigated (Opacus' `secure_mode` addresses them).",
        "**Budget checks** use the same accountant and the same schedule as training: an institution declines a "
        "round whose projected ε after that round would exceed the budget.",
    ]
    return [items] if r["dp_enabled"] else ["None apply: without DP-SGD there is no guarantee to qualify."]


def _randomness(r: dict[str, Any]) -> str:
    if r["settings"].get("reproducible_noise", True):
        return ("**Randomness** (research only): this run set `dp.reproducible_noise`: the Poisson sampling, the DP "
                "noise and dropout each came from their own stream, derived from the run seed, the round and the "
                "institution's name. The streams are independent of each other, but the server knows the seed and "
                "could regenerate the noise, so the guarantee does not hold against the server; it still holds "
                "against anyone who sees only the final adapter.")
    return ("**Randomness**: in each round, each institution draws three separate seeds from the operating "
            "system's secure randomness, one each for the Poisson sampling, the DP noise and dropout, and never sends "
            "them; the noise is therefore independent of which records were sampled, as the analysis assumes "
            "(`tests/privacy/test_randomness.py` checks it statistically). PyTorch's generators are not themselves "
            "cryptographic (Opacus' `secure_mode` is off), which the standard analysis does not require but a "
            "formal deployment may.")


def _delta_sentence(r: dict[str, Any]) -> str:
    checks = {c["name"]: c["delta_below_1_over_n"] for c in r["clients"] if c["steps"]}
    if not checks:
        return "No institution trained, so there is nothing to check."
    failed = [name for name, ok in checks.items() if ok is False]
    unknown = [name for name, ok in checks.items() if ok is None]
    if failed:
        return f"**It does not hold** for {', '.join(failed)}: their sampling rate shows n ≥ 1/δ."
    if unknown:
        return (f"The ledger cannot confirm it for {', '.join(unknown)}; check δ < 1/n against their record "
                "counts.")
    return (f"It holds for every institution that trained: q and the batch size B bound each one's records "
            f"(n ≤ B/q), and δ = {_g(r['delta'])} < 1/n for all.")


def _settings_table(r: dict[str, Any]) -> Table:
    s = r["settings"]
    rows = [["run directory", f"`{r['run_dir']}`"], ["report generated by", r["generated_by"]],
            ["DP-SGD (sample-level)", "on" if r["dp_enabled"] else "**off**"],
            ["accountant", r["accountant"]["name"].upper()], ["δ", _g(r["delta"])],
            ["ε budget per institution",
             {INF: "none (∞)", None: "unknown"}.get(r["epsilon_budget"], _g(r["epsilon_budget"]))],
            ["target ε (σ solved per institution; also caps the budget)",
             _g(r["target_epsilon"]) if r["target_epsilon"] else "none (σ set directly)"],
            ["rounds (planned / in the ledger)", f"{_g(r['rounds_planned'])} / {r['rounds_in_ledger']}"],
            ["institutions (configured / in the ledger)", f"{_g(s.get('clients'))} / {len(r['clients'])}"]]
    if "config_error" in s:
        rows.append(["config.toml", f"could not be read: {s['config_error']}"])
    else:
        rows += [["σ / C (configured)", f"{_g(s['noise_multiplier'])} / {_g(s['max_grad_norm'])}"],
                 ["batch size B (the expected Poisson batch is n·q, per institution above) / local epochs",
                  f"{s['batch_size']} / {s['local_epochs']}"],
                 ["fraction of institutions asked to train per round", _g(s["fraction_train"])],
                 ["client-level DP (configured)", s["client_dp"]],
                 ["secure aggregation (configured)", "on" if s["secagg"] else "off"], ["seed", str(s["seed"])]]
    return Table(["setting", "value"], rows)


def _detail(r: dict[str, Any]) -> list[Block]:
    clients = sorted(r["clients"], key=lambda c: _float(c["epsilon"]), reverse=True)
    shown = clients if len(clients) <= DETAIL_CLIENTS else clients[:10]
    blocks: list[Block] = []
    if len(shown) < len(clients):
        blocks.append(f"The {len(shown)} institutions with the highest ε; every entry of all {len(clients)} is in "
                      f"`{REPORT_JSON}` and `{LEDGER}`.")
    other_key = f"epsilon_{r['accountant']['other']}"
    for c in sorted(shown, key=lambda c: c["name"]):
        rows = [[str(e["round"]), e["status"], _g(e.get("noise_multiplier")), _g(e.get("max_grad_norm")),
                 _g(e.get("sample_rate")), _g(e.get("steps")), _eps(e.get("epsilon")), _eps(e.get(other_key)),
                 _note(e)] for e in c["entries"]]
        blocks += [f"**`{c['name']}`**",
                   Table(["round", "status", "σ", "C", "q", "steps", "ε", f"ε ({r['accountant']['other'].upper()})",
                          "note"], rows)]
    return blocks or ["No entries."]


def _note(entry: dict[str, Any]) -> str:
    notes = ["interrupted before commit" if entry.get("interrupted") else "",
             "reported ε below the ledger's record (state lost)" if entry.get("state_lost") else "",
             "continued from the ledger's record (adopt-ledger-spending)"
             if entry.get("adopted_ledger_spending") else "",
             f"policy: {entry['policy']}" if entry.get("policy") else "", str(entry.get("reason", ""))]
    return "; ".join(n for n in notes if n)


def _eps(value: float | str | None) -> str:
    return "–" if value is None else "∞" if value == INF else f"{value:.2f}"


def _g(value: Any) -> str:
    return "–" if value is None else "∞" if value == INF else f"{value:.4g}" if isinstance(value, float) else str(value)


def _ratio(epsilon: float) -> str:
    factor = math.exp(min(epsilon, 700.0))  # e^700 is near the largest float
    return f"{factor:.2f}" if factor < 10 else f"{factor:,.0f}" if factor < 1e6 else f"{factor:.1e}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---- rendering --------------------------------------------------------------------------------
def _title(r: dict[str, Any]) -> str:
    return f"Privacy report: {Path(r['run_dir']).name}"


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# {_title(report)}"]
    for title, blocks in _sections(report):
        parts.append(f"## {title}")
        parts.extend(_md(block) for block in blocks)
    return "\n\n".join(parts) + "\n"


def _md(block: Block) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, list):
        return "\n".join(f"- {item}" for item in block)
    if isinstance(block, Plot):
        return f"![{block.alt}]({PLOT_PNG})"
    cells = [block.header, ["---"] * len(block.header), *block.rows]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells)


def render_html(report: dict[str, Any], png_bytes: bytes) -> str:
    """One self-contained page: the same sections as the Markdown, the plot embedded as base64 PNG."""
    image = "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")
    body = [f"<h1>{_inline(_title(report))}</h1>"]
    for title, blocks in _sections(report):
        body.append(f"<h2>{_inline(title)}</h2>")
        body.extend(_html(block, image) for block in blocks)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(_title(report))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


CSS = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
       "table{border-collapse:collapse;margin:0.5rem 0 1rem}th,td{border:1px solid #ccc;padding:0.2rem 0.5rem;"
       "text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 0.2rem}img{max-width:100%}")


def _html(block: Block, image: str) -> str:
    if isinstance(block, str):
        return f"<p>{_inline(block)}</p>"
    if isinstance(block, list):
        return "<ul>\n" + "\n".join(f"<li>{_inline(item)}</li>" for item in block) + "\n</ul>"
    if isinstance(block, Plot):
        return f'<p><img src="{image}" alt="{html.escape(block.alt)}"></p>'
    head = "".join(f"<th>{_inline(c)}</th>" for c in block.header)
    rows = "\n".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
    return f"<table>\n<tr>{head}</tr>\n{rows}\n</table>"


def _inline(text: str) -> str:
    """The two Markdown marks the report uses, **bold** and `code`, as HTML."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


# ---- files ------------------------------------------------------------------------------------
def write_report(run_dir: Path, report: dict[str, Any] | None = None) -> Path:
    """Write the four report files into RUN_DIR (each atomically; all are rendered before any is
    written); returns the Markdown report's path."""
    run_dir = Path(run_dir)
    report = report if report is not None else build_report(run_dir)
    png = plot_epsilon(report)
    page, text = render_html(report, png), render_markdown(report)
    write_bytes_atomic(run_dir / PLOT_PNG, png)
    write_json_atomic(run_dir / REPORT_JSON, report)
    write_text_atomic(run_dir / REPORT_HTML, page)
    write_text_atomic(run_dir / REPORT_MD, text)
    return run_dir / REPORT_MD
