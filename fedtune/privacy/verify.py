"""`fedtune privacy-verify RUN_DIR`: an auditor's check of a run's privacy ledger.

It trusts neither the clients' reported ε nor Opacus. From each client's ledger entries alone
(σ, q, steps, n, δ) and the run's config.toml it checks that:
- every reported ε is at least what Google's dp-accounting (its pessimistic PLD, a near-exact ε of
  the mechanism) computes for the recorded history up to it, in the order the client spent it
  (spending_order) (privacy/independent.py), up to the PLD's discretization (RELATIVE_SLACK);
- a client's ε never decreases from one entry to the next (entries recorded late aside);
- δ < 1/n for the n records the client reported;
- q and the steps match n, the batch size and the local epochs (privacy/budget.py's schedule),
  except in entries recorded late, which in older ledgers may be another run's spending;
- no reported ε exceeds the run's budget;
- each status is coherent: trained rounds took steps, declined and refused ones none, a refusal
  says why, entries come in the order of the rounds they were recorded in;
- under distributed DP, every share of a round is of one σ and of the run's t;
- the client-level account, when the run has client-level DP: there is one, its z, q, δ and clipping
  are the run config's, and its ε matches dp-accounting too.

Each violation names the client, the round, the field, what was expected and what was found.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune import constants as k
from fedtune.config import FedtuneConfig, read_run_config
from fedtune.errors import ConfigError
from fedtune.privacy.budget import poisson_schedule
from fedtune.privacy.independent import epsilons_along, independent_client_level_epsilon
from fedtune.privacy.ledger import LedgerEntry, read_ledger

# A reported ε may sit this far below dp-accounting's pessimistic PLD before it counts as under-reported:
# every valid figure is at least the true ε, which the PLD overstates only by its discretization.
# Opacus' PRV, the closest valid figure, sat 0.010 to 0.012 above it in 150 configurations (a review;
# tests/privacy/test_independent_accountant.py). A 1% slack let a PRV ledger report 7.90 for 7.99.
RELATIVE_SLACK = 1e-3
ABSOLUTE_SLACK = 0.005
NO_STEPS = (k.STATUS_DECLINED, k.STATUS_REFUSED)
FIGURES = ("noise_multiplier", "sample_rate", "delta")  # what recomputing a step's ε needs


@dataclass(frozen=True)
class Violation:
    client: str
    round: int | None
    field: str
    expected: str
    found: str

    def line(self) -> str:
        where = "" if self.round is None else f" round {self.round}"
        return f"{self.client}{where}: {self.field}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class Verification:
    clients: int
    entries: int
    violations: list[Violation]

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "clients": self.clients, "entries": self.entries,
                "violations": [asdict(v) | {"line": v.line()} for v in self.violations]}


def verify_run(run_dir: Path) -> Verification:
    """Check RUN_DIR's privacy ledger against its config (raises FedtuneError if either is unreadable)."""
    ledger = read_ledger(Path(run_dir))
    cfg = read_run_config(Path(run_dir))
    violations: list[Violation] = []
    if ledger.unit != cfg.dp.unit:  # every ε below is of the config's unit: the ledger must claim that one
        violations.append(Violation("ledger", None, "unit", f"{cfg.dp.unit} (the run's dp.unit)", ledger.unit))
    if ledger.dp_enabled and cfg.dp.distributed_min_honest and ledger.accountant != "skellam":
        violations.append(Violation("ledger", None, "accountant", "skellam (distributed DP's integer shares; a "
                                    "ledger of Gaussian shares is an earlier fedtune's, whose rounding was not "
                                    "proven against the coordinator)", ledger.accountant))
    run_file = Path(run_dir) / k.RUN_ID_FILE  # read, never made here: verifying writes nothing
    run_id = run_file.read_text(encoding="utf-8").strip() if run_file.is_file() else None
    entries = 0
    clients = ledger.clients
    for name, rows in sorted(clients.items()):
        entries += len(rows)
        violations += list(_client(name, rows, ledger.accountant, ledger.dp_enabled, cfg, run_id))
    if ledger.dp_enabled and cfg.dp.distributed_min_honest:
        violations += list(_one_sigma_a_round(clients, cfg.dp.distributed_min_honest))
    violations += list(_client_level(ledger.client_level, cfg, ran=bool(clients), retried=_rounds_run_again(clients),
                                     committed=_committed_rounds(Path(run_dir))))
    return Verification(len(clients), entries, violations)


def _committed_rounds(run_dir: Path) -> int:
    """The last round metrics.jsonl records as committed (0: none, or no file)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return max((int(row.get("round", 0)) for row in rows), default=0)
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is damaged ({type(err).__name__}: {err}): each line must be one round's JSON "
                          "object. Restore it from a backup (each checkpoints/round_*.pt holds the rows up to its "
                          "round).") from None


def _one_sigma_a_round(clients: dict[str, tuple[LedgerEntry, ...]], t: int) -> Iterator[Violation]:
    """Distributed DP: a round's sum carries σ only if every share in it is of that σ and of the run's t
    (docs/privacy.md, "One σ for every share"), and each client's ε is of its own σ. So in each round
    every entry's σ (noise-only shares too) must be the same, and each entry's t the run's (q is the
    run's schedule's, checked by _sampling). A coordinator that sent one institution a larger target ε than the others
    would show here: that institution's ε is of a σ the sum did not carry."""
    first: dict[tuple[int, bool], tuple[str, LedgerEntry]] = {}  # a round's (try's) first share, any status
    for name, rows in sorted(clients.items()):
        for row in rows:
            if row.noise_multiplier is None or _older_late(row):
                continue
            bad = _Row(name, row)
            if row.distributed_min_honest != t:
                yield bad("distributed_min_honest", f"{t} (the run's dp.distributed_min_honest)",
                          row.distributed_min_honest)
            # A try a crash cut short (interrupted, or reported late) was its own sum; its retry, in a run
            # extended meanwhile, may rightly be of another σ (solved over more rounds).
            sum_ = (row.round, row.interrupted or row.recorded_late)
            other, seen = first.setdefault(sum_, (name, row))
            if not math.isclose(row.noise_multiplier, seen.noise_multiplier, rel_tol=1e-9):
                yield bad("noise_multiplier", f"{seen.noise_multiplier:.6g} ({other}'s in the same round: every "
                          "share of a round's sum must be of one σ)", f"{row.noise_multiplier:.6g}")


def _client(name: str, rows: tuple[LedgerEntry, ...], kind: str, dp_on: bool,
            cfg: FedtuneConfig, run_id: str | None = None) -> Iterator[Violation]:
    reported = [row for row in rows if row.reported]  # failures the server recorded carry no figures
    for row in rows:  # steps without an ε: not a server-recorded failure, and steps the check below would skip
        if not row.reported and row.steps:
            yield _Row(name, row)("epsilon", "a number (an entry that took steps reports its ε)", "null")
    cap = min(cfg.dp.epsilon_budget, cfg.dp.target_epsilon) if cfg.dp.target_epsilon > 0 else cfg.dp.epsilon_budget
    previous_round, highest = -1, 0.0
    for row in reported:
        bad = _Row(name, row)
        if row.ledger_round < previous_round:
            yield bad("round", f">= {previous_round} (entries in the order they were recorded)", row.ledger_round)
        previous_round = row.ledger_round
        if row.run is not None and run_id is not None and row.run != run_id:
            yield bad("run", f"{run_id} (this run's id: a client reports late only this run's spending)", row.run)
        yield from _status(bad, row, dp_on)
        for field in _missing(row):
            yield bad(field, "a number (a figure of a round that took steps)", "null")
        if row.steps and not _missing(row):
            yield from _sampling(bad, row, cfg)
        found = row.epsilon  # math.inf when unbounded
        if not row.recorded_late:  # one recorded late was spent before the entries recorded ahead of it
            if found < highest * (1 - 1e-9):
                yield bad("epsilon", f">= {highest:.4f} (a client's ε never decreases)", f"{found:.4f}")
            highest = max(highest, found)
        if found > cap * (1 + 1e-9) and row.status != k.STATUS_REFUSED:
            yield bad("epsilon", f"<= {cap:g} (the run's ε budget)", _eps(found))
    if not any(_missing(row) for row in reported):  # without them there is nothing to recompute ε from
        yield from _against_dp_accounting(name, spending_order(reported), kind, dp_on, cfg)


def _missing(row: LedgerEntry) -> list[str]:
    """The figures an entry that took steps needs for its ε to be recomputed, where it has none."""
    return [field for field in FIGURES if getattr(row, field) is None] if row.steps else []


def spending_order(reported: list[LedgerEntry]) -> list[LedgerEntry]:
    """A client's reported entries in the order it spent them. Those recorded when they happened keep
    the ledger's order. One recorded late (a reply the server never got, or, in a ledger written
    before client entries named their run, another run's spending in the institution's state
    directory) carries the cumulative ε the client had then, so it goes before the first entry with a
    higher ε."""
    order = [row for row in reported if not row.recorded_late]
    for late in (row for row in reported if row.recorded_late):
        at = next((i for i, row in enumerate(order) if row.epsilon > late.epsilon), len(order))
        order.insert(at, late)
    return order


def _against_dp_accounting(name: str, order: list[LedgerEntry], kind: str, dp_on: bool,
                           cfg: FedtuneConfig) -> Iterator[Violation]:
    """Each reported ε against dp-accounting's for the spending up to it. An entry recorded late may
    be another run's (older ledgers), reported at that run's δ; the last spending a client reports is
    always this run's, so its final ε is checked at the run's δ."""
    history = [(row.noise_multiplier, row.sample_rate, row.steps) for row in order]
    deltas = [row.delta if _older_late(row) else cfg.dp.delta for row in order]
    expected = epsilons_along(kind, history, deltas) if dp_on else [math.inf] * len(order)
    for row, independent in zip(order, expected, strict=True):
        if row.epsilon < independent * (1 - RELATIVE_SLACK) - ABSOLUTE_SLACK:
            yield _Row(name, row)("epsilon", f"{_eps(independent)} (dp-accounting, from the ledger's σ, q and "
                                             "steps)", _eps(row.epsilon))
    if dp_on and order and _older_late(order[-1]) and order[-1].delta != cfg.dp.delta:
        yield _Row(name, order[-1])("delta", f"{cfg.dp.delta:g} (the run's δ: a client's last spending is this "
                                             "run's)", f"{order[-1].delta:g}")


def _older_late(row: LedgerEntry) -> bool:
    """Recorded late in a ledger written before client entries named their run: possibly another run's
    spending, at that run's schedule and δ. One that names its run is this run's (checked above)."""
    return row.recorded_late and row.run is None


class _Row:
    """Makes the Violations of one ledger entry."""

    def __init__(self, client: str, row: LedgerEntry) -> None:
        self.client, self.round = client, row.round

    def __call__(self, field: str, expected: Any, found: Any) -> Violation:
        return Violation(self.client, self.round, field, str(expected), str(found))


def _status(bad: _Row, row: LedgerEntry, dp_on: bool) -> Iterator[Violation]:
    status, steps = row.status, row.steps
    if status not in (k.STATUS_TRAINED, k.STATUS_REJECTED, k.STATUS_FAILED, *NO_STEPS):
        yield bad("status", "trained, rejected, failed, declined or refused", status)
    elif status in NO_STEPS and steps:
        yield bad("steps", f"0 (a {status} round trains nothing)", steps)
    elif status in (k.STATUS_TRAINED, k.STATUS_REJECTED) and not steps:
        yield bad("steps", f"> 0 (a {status} round ran local training)", steps)
    if status == k.STATUS_REFUSED and not row.reason:
        yield bad("reason", "the institution's reason for refusing", "none")
    if dp_on and status in (k.STATUS_TRAINED, k.STATUS_REJECTED) and row.noise_multiplier \
            and math.isinf(row.epsilon):
        yield bad("epsilon", "a finite ε (the round trained with noise)", "null")


def _sampling(bad: _Row, row: LedgerEntry, cfg: FedtuneConfig) -> Iterator[Violation]:
    """δ < 1/n, and q and the steps of this run's schedule; not the schedule for an entry recorded
    late in an older ledger, which may be another run's spending (the institution's state directory
    carried it)."""
    n = row.num_examples
    if not isinstance(n, int) or n <= 0:
        yield bad("num_examples", f"the client's {cfg.dp.unit} count (written by fedtune >= 0.2)", n)
        return
    if row.delta * n >= 1:
        yield bad("delta", f"< 1/n = {1 / n:.3g} (n = {n} {cfg.dp.unit}s)", f"{row.delta:g}")
    if _older_late(row):
        return
    train = cfg.train
    q, steps = poisson_schedule(n, train.batch_size, train.local_epochs, train.sample_rate)
    why = f"train.sample_rate {train.sample_rate:g}" if train.sample_rate else f"n = {n}, batch size {train.batch_size}"
    if not math.isclose(row.sample_rate, q, rel_tol=1e-9):
        yield bad("sample_rate", f"{q:.6g} ({why})", f"{row.sample_rate:.6g}")
    if row.steps != steps:
        yield bad("steps", f"{steps} ({why}, {train.local_epochs} local epochs)", row.steps)


def _rounds_run_again(clients: dict[str, tuple[LedgerEntry, ...]]) -> int:
    """How many times a crash cut a round short and it ran again: per round, the most interrupted
    entries of it any one client has (each try that reached the ledger left one), summed. Entries
    recorded late after the last round and marked interrupted ran no round again."""
    tries: dict[int, int] = {}
    for rows in clients.values():
        mine: dict[int, int] = {}
        for row in rows:
            if row.interrupted and not row.recorded_late:
                mine[row.round] = mine.get(row.round, 0) + 1
        for round_, count in mine.items():
            tries[round_] = max(tries.get(round_, 0), count)
    return sum(tries.values())


def _client_level(entry: dict[str, Any] | None, cfg: FedtuneConfig, ran: bool, retried: int = 0,
                  committed: int = 0) -> Iterator[Violation]:
    """The client-level account: its figures are the run config's (z, q = m/N, δ, the clipping), and
    its ε matches dp-accounting's for them. A run with client-level DP that ran a round must have one, and a
    run without it none. Its releases are at most the run's rounds, plus one for each round a crash cut
    short and ran again (`retried`, _rounds_run_again): the release of each try counts; and at least the
    rounds committed (`committed`, metrics.jsonl), each of which released the noised model once."""
    dp = cfg.dp
    if dp.client_dp == "off" and entry:  # the report would show a client-level guarantee nobody asked for
        yield Violation("client-level", None, "client_level", "none (dp.client_dp = off)", "an account")
        return
    if dp.client_dp == "off" or not entry:
        if dp.client_dp != "off" and ran:
            yield Violation("client-level", None, "client_level", f"an account (dp.client_dp = {dp.client_dp})",
                            "none")
        return
    expected = {"clipping": dp.client_dp, "side": dp.client_dp_side, "noise_multiplier": dp.client_noise_multiplier,
                "sample_rate": cfg.clients_sampled() / cfg.clients, "delta": dp.delta}
    for key, want in expected.items():
        got = entry.get(key)
        same = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) and isinstance(got, int | float) \
            else got == want
        if not same:
            yield Violation("client-level", None, key, f"{want} (the run's config)", str(got))
    if entry.get("rounds", 0) > cfg.rounds + retried:
        yield Violation("client-level", None, "rounds", f"<= {cfg.rounds + retried} (the run's rounds"
                        + (f", and {retried} cut short by a crash and run again" if retried else "") + ")",
                        str(entry["rounds"]))
    if entry.get("rounds", 0) < committed:
        yield Violation("client-level", None, "rounds", f">= {committed} (the rounds committed in metrics.jsonl, "
                        "each a release)", str(entry["rounds"]))
    if entry.get("epsilon") is None:
        return
    independent = independent_client_level_epsilon(entry["noise_multiplier"], entry["sample_rate"], entry["rounds"],
                                                    entry["delta"])
    if entry["epsilon"] < independent * (1 - RELATIVE_SLACK) - ABSOLUTE_SLACK:
        yield Violation("client-level", None, "epsilon", f"{_eps(independent)} (dp-accounting PLD)",
                        _eps(entry["epsilon"]))


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"
