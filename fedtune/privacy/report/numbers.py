"""Every number the privacy report states, typed, from a run directory.

`build_report` is the only part of the report that reads files: the privacy ledger (through
`read_ledger`), config.toml (`read_run_config`), `privacy-verify`'s check of the ledger and, when
`fedtune audit` made the run, audit.json. The numbers are JSON-ready as they stand: ∞ is always
the string "inf" and None means "not applicable"; `ReportData.to_dict()` is privacy_report.json.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune import __version__
from fedtune import constants as k
from fedtune.config import read_run_config
from fedtune.errors import FedtuneError
from fedtune.privacy.accountant import epsilon, merged
from fedtune.privacy.audit import AUDIT_FILE
from fedtune.privacy.ledger import LedgerEntry, read_ledger

if TYPE_CHECKING:  # verify.py loads dp-accounting: imported when the check runs
    from fedtune.privacy.verify import Verification

REPORT_MD, REPORT_JSON, REPORT_HTML, PLOT_PNG = (
    "privacy_report.md", "privacy_report.json", "privacy_report.html", "privacy_epsilon.png")
INF = "inf"
EPSILON_KEYS = ("epsilon", "epsilon_rdp", "epsilon_prv")
NEIGHBOURS = ("add/remove one record of one institution, with that institution's record count n public: the "
              "averaging, and (unless train.sample_rate fixes them) q and the number of steps, depend on n, and n "
              "is reported to the server in the clear")
USER_NEIGHBOURS = ("add/remove one user of one institution with all of that user's records, with that institution's "
                   "user count n public: the averaging, and (unless train.sample_rate fixes them) q and the number "
                   "of steps, depend on n, and n is reported to the server in the clear")
AUDIT_KEYS = ("round", "method", "canaries", "canaries_in", "canary_repeats", "guesses", "guesses_in",
              "guesses_out", "correct", "epsilon_lower_bound", "epsilon_theoretical", "delta", "confidence",
              "hypotheses", "auc", "tpr_at_fpr_0.01", "consistent")
AUDIT_POWER_KEYS = ("epsilon_largest_certifiable", "canaries_to_certify_theoretical", "vantage", "unit",
                    "epsilon_estimate", "epsilon_estimate_interval", "canary_kind")  # newer keys, optional

Epsilon = float | str  # a cumulative ε, or INF


def as_float(value: float | str | None) -> float:
    """An ε or budget as a number to compare or sort by: INF is math.inf, None is 0."""
    return math.inf if value == INF else float(value or 0.0)


def _plain(value: Any) -> Any:
    """A field as privacy_report.json holds it: parts by their own to_dict, tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _fields_dict(obj: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}


@dataclass(frozen=True)
class Settings:
    """The run's privacy-relevant options from config.toml; all None (and `config_error` set) if
    it cannot be read."""

    rounds: int | None = None
    clients: int | None = None
    clients_sampled: int | None = None  # m: institutions a round (SecAgg+'s threshold is 2/3 of them)
    seed: int | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    delta: float | None = None
    epsilon_budget: Epsilon | None = None
    target_epsilon: float | None = None  # None: σ set directly
    epsilon_cap: Epsilon | None = None  # a client declines past it: the target ε also caps the budget
    batch_size: int | None = None
    local_epochs: int | None = None
    fraction_train: float | None = None
    client_dp: str | None = None
    secagg: bool | None = None
    reproducible_noise: bool | None = None
    public_streams: bool = False  # dp.public_streams: the sampling stream derived (white-box audit)
    unit: str | None = None  # dp.unit
    user_column: str | None = None  # data.user_column, when set
    max_records_per_user: int | None = None  # dp.max_records_per_user (unit `user`)
    user_gradient: str | None = None  # dp.user_gradient (unit `user`)
    config_error: str | None = None

    @property
    def noise_from_seed(self) -> bool:
        """The run set `dp.reproducible_noise`, or its config cannot tell (then assume it did)."""
        return self.reproducible_noise is not False

    def to_dict(self) -> dict[str, Any]:
        if self.config_error is not None:
            return {"config_error": self.config_error}
        return {key: value for key, value in _fields_dict(self).items() if key != "config_error"}


@dataclass(frozen=True)
class Accountant:
    """Which accountant gave the main ε, and the parameters of its bound."""

    name: str  # "prv", "rdp" or "skellam"
    other: str  # the cross-check beside it
    bound: str
    eps_error: float | None = None  # PRV
    delta_error: float | None = None  # PRV
    orders: int | None = None  # RDP
    order_min: float | None = None  # RDP
    order_max: float | None = None  # RDP

    def to_dict(self) -> dict[str, Any]:
        keys = ("eps_error", "delta_error") if self.name == "prv" else ("orders", "order_min", "order_max")
        return {key: getattr(self, key) for key in ("name", "other", "bound", *keys)}


@dataclass(frozen=True)
class AuditSummary:
    """audit.json's summary (AUDIT_KEYS; not its per-canary lists)."""

    round: int
    method: str
    canaries: int
    canaries_in: int
    canary_repeats: int
    guesses: int
    guesses_in: int
    guesses_out: int
    correct: int
    epsilon_lower_bound: float
    epsilon_theoretical: Epsilon
    delta: float
    confidence: float
    hypotheses: int
    auc: float | None
    tpr_at_fpr_001: float | None  # "tpr_at_fpr_0.01": the true-positive rate at 1% false positives
    consistent: bool
    epsilon_largest_certifiable: float | None = None  # the audit's power: its bound for perfect guesses
    canaries_to_certify_theoretical: int | None = None  # None: unreachable at this δ, or ε = ∞
    vantage: str | None = None  # "final" or "server" (None: an audit from before vantages, i.e. final)
    unit: str | None = None  # "user": canary users; "client": canary institutions (None: older audits, records)
    epsilon_estimate: float | None = None  # canary institutions: Andrew et al.'s one-shot estimate
    epsilon_estimate_interval: list[float] | None = None  # its sampling error: ε at μ ∓ 1.96 standard errors
    canary_kind: str | None = None  # "gradient": each canary's gradient was 10·C along a random direction

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(AUDIT_KEYS + AUDIT_POWER_KEYS, (getattr(self, f.name) for f in fields(self)), strict=True))


@dataclass(frozen=True)
class ClientRow:
    """One institution: its cumulative ε (the latest entry that carries one) and its parameters."""

    name: str
    epsilon: Epsilon
    epsilon_other: Epsilon
    delta: float | None
    noise_multiplier: float | None  # σ, C, q and n: of its latest trained round
    max_grad_norm: float | None
    sample_rate: float | None
    num_examples: int | None
    expected_batch: float | None
    parameters_changed: bool
    steps: int
    rounds_trained: int
    rounds_declined: int
    rounds_failed: int
    rounds_rejected: int
    rounds_refused: int
    state_lost: bool
    rounds_interrupted: int
    within_budget: bool | None
    # ε of the steps this run's ledger records for it alone, by the run's accountant (None: DP off, or a step
    # without σ). `epsilon` can be larger: a client reports all the spending its own state holds, other runs'
    # in the same state directory included (client/state.py), so its ε never restarts with a new run.
    epsilon_this_run: Epsilon | None
    records_at_most: int | None
    delta_below_1_over_n: bool | None
    epsilon_by_round: tuple[Epsilon, ...]  # after each round 0..rounds_in_ledger
    entries: tuple[dict[str, Any], ...]  # its ledger entries as the JSON states them (∞ as INF)
    # Its last entry is a failure the server recorded without figures (no reply, or an error in its place),
    # and it has reported nothing since: it may have trained in that round, and that spending is not in
    # `epsilon` (server/spending.py::awaiting_report; its own ledger copy holds it).
    awaiting_report: bool = False

    @property
    def holds_more_than_this_run(self) -> bool:
        """Its ε is above what this run's recorded steps give (beyond floating-point rounding: the client
        and the report run the same accountant over the same steps otherwise)."""
        if self.epsilon_this_run is None:
            return False
        return as_float(self.epsilon) > as_float(self.epsilon_this_run) * (1 + 1e-6) + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


@dataclass(frozen=True, kw_only=True)
class ReportData:
    """Every number the report states; `to_dict()` is privacy_report.json."""

    generated_by: str
    run_dir: str
    dp_enabled: bool
    unit: str
    neighbouring_relation: str = NEIGHBOURS
    accountant: Accountant
    sampling: str = "poisson"
    policies: tuple[str, ...]  # whose privacy policy the clients applied: "node config", "run config"
    delta: float | None
    epsilon_budget: Epsilon | None  # None: config.toml unreadable, budget unknown
    target_epsilon: float | None
    rounds_planned: int | None
    rounds_in_ledger: int
    epsilon_max: Epsilon
    epsilon_max_client: str | None
    epsilon_max_other: Epsilon
    clients_declined: tuple[str, ...]
    rounds_declined: int
    rounds_failed: int
    rounds_rejected: int
    rounds_refused: int
    clients_state_lost: tuple[str, ...]
    clients_over_budget: tuple[str, ...]
    client_level: dict[str, Any] | None  # the ledger's client-level accounting, ∞ as INF
    settings: Settings
    audit: AuditSummary | None  # None unless `fedtune audit` made this run
    verification: Verification | None  # `fedtune privacy-verify`'s result; None: config unreadable
    clients: tuple[ClientRow, ...]
    # Distributed DP: {"min_honest": t, "epsilon_own_share": the largest ε an institution's own σ/√t alone
    # gives}; None when every institution added all of its noise.
    distributed: dict[str, Any] | None = None
    # Whether the run has finished (every round committed, or stopped early, and its summary written):
    # False, and a stopped run's ledger may lack the spending of the round it stopped in; None: not known.
    run_finished: bool | None = None
    # The clients whose last round failed without figures and who have reported nothing since: each may
    # have spent more than the ledger shows (ClientRow.awaiting_report).
    clients_awaiting_report: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


def build_report(run_dir: Path, run_finished: bool | None = None) -> ReportData:
    """Every number the report states, from RUN_DIR/privacy_ledger.json and config.toml; `run_finished`
    as the caller reads the run directory (server/run_dir.py::RunDirectory.finished), None if unknown."""
    run_dir = Path(run_dir)
    ledger = read_ledger(run_dir)
    settings = _settings(run_dir)
    dp_on, kind = ledger.dp_enabled, ledger.accountant
    entries = dict(sorted(ledger.clients.items()))
    rounds = max((e.round for rows in entries.values() for e in rows), default=0)
    delta = settings.delta or next((e.delta for rows in entries.values() for e in rows if e.delta is not None), None)
    clients = tuple(_client(name, rows, dp_on, rounds, settings, kind, delta) for name, rows in entries.items())
    top = max(clients, key=lambda c: as_float(c.epsilon), default=None)
    top = top if top and as_float(top.epsilon) > 0 else None  # nobody spent anything: no "top" client
    return ReportData(
        generated_by=f"fedtune {__version__}",
        run_dir=str(run_dir.resolve()),
        dp_enabled=dp_on,
        unit=ledger.unit,
        neighbouring_relation=USER_NEIGHBOURS if ledger.unit == "user" else NEIGHBOURS,
        accountant=_accountant(kind, delta),
        policies=tuple(sorted({e.policy for rows in entries.values() for e in rows if e.policy})),
        delta=delta,
        epsilon_budget=settings.epsilon_cap,
        target_epsilon=settings.target_epsilon,
        rounds_planned=settings.rounds,
        rounds_in_ledger=rounds,
        epsilon_max=(top.epsilon if top else 0.0) if dp_on else INF,
        epsilon_max_client=top.name if top and dp_on else None,
        epsilon_max_other=max((c.epsilon_other for c in clients), key=as_float, default=0.0) if dp_on else INF,
        clients_declined=tuple(c.name for c in clients if c.rounds_declined),
        rounds_declined=sum(c.rounds_declined for c in clients),
        rounds_failed=sum(c.rounds_failed for c in clients),
        rounds_rejected=sum(c.rounds_rejected for c in clients),
        rounds_refused=sum(c.rounds_refused for c in clients),
        clients_state_lost=tuple(c.name for c in clients if c.state_lost),
        clients_over_budget=tuple(c.name for c in clients if c.within_budget is False),
        client_level=_clean(ledger.client_level, True) if ledger.client_level else None,
        settings=settings,
        audit=_read_audit(run_dir),
        verification=_verification(run_dir),
        clients=clients,
        distributed=_distributed(entries, kind, delta) if dp_on else None,
        run_finished=run_finished,
        clients_awaiting_report=tuple(c.name for c in clients if c.awaiting_report) if dp_on else (),
    )


def _distributed(entries: dict[str, tuple[LedgerEntry, ...]], kind: str, delta: float | None) -> dict[str, Any] | None:
    """Under distributed DP, what each institution's own share of the noise (σ/√t) gives alone, should
    fewer than t institutions have added theirs honestly: the largest such ε over the institutions."""
    shared = [e for rows in entries.values() for e in rows if e.distributed_min_honest]
    if not shared or delta is None:
        return None
    t = max(e.distributed_min_honest for e in shared)
    damaged = any(e.steps and (e.noise_multiplier is None or e.sample_rate is None)
                  for rows in entries.values() for e in rows)  # privacy-verify names such an entry
    own = None if damaged else max(
        epsilon(kind, merged([(e.noise_multiplier / math.sqrt(e.distributed_min_honest or 1), e.sample_rate, e.steps)
                              for e in rows if e.steps]), delta) for rows in entries.values())
    rate = max((e.sample_rate for e in shared if e.steps and e.sample_rate is not None), default=1.0)  # q < 1
    return {"min_honest": t, "epsilon_own_share": _num(own), "sample_rate": rate}


def _verification(run_dir: Path) -> Verification | None:
    """privacy/verify.py's independent check of the ledger; None when config.toml cannot be read."""
    from fedtune.privacy.verify import verify_run

    try:
        return verify_run(run_dir)
    except FedtuneError:
        return None


def _settings(run_dir: Path) -> Settings:
    try:
        cfg = read_run_config(run_dir)
    except FedtuneError as err:
        return Settings(config_error=str(err))
    dp = cfg.dp
    cap = min(dp.epsilon_budget, dp.target_epsilon) if dp.target_epsilon > 0 else dp.epsilon_budget
    return Settings(
        rounds=cfg.rounds, clients=cfg.clients, clients_sampled=cfg.clients_sampled(), seed=cfg.seed,
        accountant=dp.accounting,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, delta=dp.delta,
        epsilon_budget=_num(dp.epsilon_budget), target_epsilon=dp.target_epsilon or None, epsilon_cap=_num(cap),
        batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs,
        fraction_train=cfg.strategy.fraction_train, client_dp=dp.client_dp, secagg=dp.secagg,
        reproducible_noise=dp.reproducible_noise, public_streams=dp.public_streams, unit=dp.unit,
        user_column=cfg.data.user_column or None,
        max_records_per_user=dp.max_records_per_user if dp.unit == "user" else None,
        user_gradient=dp.user_gradient if dp.unit == "user" else None,
    )


def _client(name: str, entries: tuple[LedgerEntry, ...], dp_on: bool, rounds: int, settings: Settings, kind: str,
            delta: float | None) -> ClientRow:
    # Rounds that ran local steps: trained, trained but the update refused by the server (rejected),
    # or failed after training (fail closed); all spent.
    trained = [e for e in entries if e.steps]
    reported = [e for e in entries if e.reported]  # failed rounds report nothing
    # Stand-ins when there is no such entry: nothing reported means nothing spent, no parameters known.
    latest = reported[-1] if reported else LedgerEntry(0, "", epsilon=0.0, epsilon_other=0.0)
    last = trained[-1] if trained else LedgerEntry(0, "")
    # The most any entry shows spent: a client that lost its state reported less than before (state_lost),
    # and the ledger's own recomputation of what it had spent stands beside that entry.
    spent = [x for e in reported for x in (e.epsilon, e.epsilon_recomputed) if x is not None]
    eps = _num(max(spent, default=0.0)) if dp_on else INF
    budget = settings.epsilon_cap
    params = {(e.noise_multiplier, e.max_grad_norm, e.sample_rate) for e in trained}
    # A round the server recorded as failed (no reply) whose outcome the client later reported counts once,
    # as what the client reported.
    reported_late = {e.round for e in entries if e.recorded_late}
    committed = [e for e in entries if not e.interrupted
                 and not (e.status == k.STATUS_FAILED and not e.reported and e.round in reported_late)]
    return ClientRow(
        name=name,
        epsilon=eps,
        # The most any entry shows, as for `epsilon`: a lost state's later report is lower.
        epsilon_other=_num(max((e.epsilon_other for e in reported if e.epsilon_other is not None), default=0.0))
        if dp_on else INF,
        delta=settings.delta if latest.delta is None else latest.delta,
        noise_multiplier=last.noise_multiplier,
        max_grad_norm=last.max_grad_norm,
        sample_rate=last.sample_rate,
        num_examples=last.num_examples,
        expected_batch=last.num_examples * last.sample_rate if last.num_examples and last.sample_rate is not None
        else None,
        parameters_changed=len(params) > 1,
        steps=sum(e.steps for e in trained),
        rounds_trained=sum(e.status == k.STATUS_TRAINED for e in committed),
        rounds_declined=sum(e.status == k.STATUS_DECLINED for e in committed),
        rounds_failed=sum(e.status == k.STATUS_FAILED for e in committed),
        rounds_rejected=sum(e.status == k.STATUS_REJECTED for e in committed),
        rounds_refused=sum(e.status == k.STATUS_REFUSED for e in committed),
        state_lost=any(e.state_lost for e in entries),
        rounds_interrupted=sum(e.interrupted for e in entries),
        within_budget=None if not dp_on or budget is None else as_float(eps) <= as_float(budget),
        epsilon_this_run=_this_run(trained, kind, delta if latest.delta is None else latest.delta) if dp_on else None,
        records_at_most=_records_at_most(trained, settings.batch_size),
        delta_below_1_over_n=_delta_check(trained, settings.batch_size, latest.delta),
        epsilon_by_round=_curve(reported, rounds, dp_on),
        entries=tuple(_clean(e.to_dict(), dp_on) for e in entries),
        awaiting_report=bool(entries) and entries[-1].status == k.STATUS_FAILED and not entries[-1].reported,
    )


def _this_run(trained: list[LedgerEntry], kind: str, delta: float | None) -> Epsilon | None:
    """ε of these entries' steps alone (privacy/accountant.py); None without δ or where a step has no σ."""
    if delta is None or any(e.noise_multiplier is None or e.sample_rate is None for e in trained):
        return None
    # merged: PRV composes one distribution per entry given, so 200 rounds of one σ took minutes unjoined
    return _num(epsilon(kind, merged([(e.noise_multiplier, e.sample_rate, e.steps) for e in trained]), delta))


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


def _curve(reported: list[LedgerEntry], rounds: int, dp_on: bool) -> tuple[Epsilon, ...]:
    """Cumulative ε after each round 0..rounds of the ledger (an entry recorded late at the round it was
    recorded); a round the client sat out keeps the last value. As for the client's ε, the most any entry
    shows so far: a lost state's lower report does not lower the curve, and the ledger's recomputation
    beside it counts."""
    if not dp_on:
        return (INF,) * (rounds + 1)
    by_round: dict[int, float] = {}
    for e in reported:
        shown = [x for x in (e.epsilon, e.epsilon_recomputed) if x is not None]
        by_round[e.ledger_round] = max(by_round.get(e.ledger_round, 0.0), *shown)
    curve, current = [], 0.0
    for round_ in range(rounds + 1):
        current = max(current, by_round.get(round_, current))
        curve.append(_num(current))
    return tuple(curve)


def _accountant(kind: str, delta: float | None) -> Accountant:
    if kind == "prv":
        eps_error = inspect.signature(PRVAccountant.get_epsilon).parameters["eps_error"].default
        return Accountant("prv", "rdp", "upper end of a numerical error interval", eps_error=eps_error,
                          delta_error=delta / 1000 if delta else None)
    if kind == "skellam":
        from fedtune.privacy.skellam import ORDERS

        return Accountant("skellam", "skellam", "upper bound (minimum over the integer Rényi orders)",
                          orders=len(ORDERS), order_min=min(ORDERS), order_max=max(ORDERS))
    alphas = RDPAccountant.DEFAULT_ALPHAS
    return Accountant("rdp", "prv", "upper bound (minimum over a finite set of Rényi orders)",
                      orders=len(alphas), order_min=min(alphas), order_max=max(alphas))


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


def _read_audit(run_dir: Path) -> AuditSummary | None:
    """audit.json's summary; None when the run was not audited."""
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
    return AuditSummary(*(audit[key] for key in AUDIT_KEYS), *(audit.get(key) for key in AUDIT_POWER_KEYS))
