"""`fedtune privacy-verify RUN_DIR`: an auditor's check of a run's privacy ledger.

It trusts neither the clients' reported ε nor Opacus. From each client's ledger entries alone
(σ, q, steps, n, δ), the run's config.toml and the copy of the ledger its latest checkpoint holds,
it checks that:
- the ledger is of the run's config: its unit and its dp_enabled are the config's (a disagreement is one
  violation), and under distributed DP it is accounted for integer shares (skellam);
- every reported ε is at least what Google's dp-accounting (its pessimistic PLD, a near-exact ε of
  the mechanism) computes for the recorded history up to it, in the order the client spent it
  (spending_order) (privacy/independent.py), up to the PLD's discretization (RELATIVE_SLACK);
- a client's ε never decreases from one entry to the next (entries recorded late aside);
- every entry's δ is the run's dp.delta, and δ < 1/n for the n records the client reported;
- where the config fixes σ (no dp.target_epsilon), every entry's σ is dp.noise_multiplier, whatever
  the node policy the client applied (_fixed_sigma);
- q and the steps match n, the batch size and the local epochs (privacy/budget.py's schedule);
  an entry that may be another run's spending (_older_late: in a ledger whose entries name no run,
  one recorded late after the server's record of that round's failure) keeps its own schedule and δ;
- no reported ε exceeds the run's budget;
- each status is coherent, in every entry: trained rounds took steps and report them with σ, q, δ
  and ε, declined and refused ones took none, only a failure or exclusion the server recorded lacks
  an ε, a refusal says why, entries come in the order of the rounds they were recorded in;
- every entry of the ledger copy in the latest readable checkpoint (checkpoints/round_NNNN.pt) is still
  in privacy_ledger.json, unchanged: no committed round or client was dropped or rewritten;
- under distributed DP, every share of a round is of one σ and of the run's t;
- the client-level account, when the run has client-level DP: there is one, its z, q, δ and clipping
  are the run config's, and its ε matches dp-accounting too.

Each violation names the client, the round, the field, what was expected and what was found.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune import constants as k
from fedtune.config import FedtuneConfig, read_run_config
from fedtune.errors import ConfigError
from fedtune.privacy.budget import poisson_schedule
from fedtune.privacy.independent import epsilons_along, independent_client_level_epsilon
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger, read_ledger

# A reported ε may sit this far below dp-accounting's pessimistic PLD before it counts as under-reported:
# every valid figure is at least the true ε, which the PLD overstates only by its discretization.
# Opacus' PRV, the closest valid figure, sat 0.010 to 0.012 above it in 150 configurations (a review;
# tests/privacy/test_independent_accountant.py). A 1% slack let a PRV ledger report 7.90 for 7.99.
RELATIVE_SLACK = 1e-3
ABSOLUTE_SLACK = 0.005
TRAINED = (k.STATUS_TRAINED, k.STATUS_REJECTED)  # rounds that ran local training
NO_STEPS = (k.STATUS_DECLINED, k.STATUS_REFUSED, k.STATUS_EXCLUDED)  # rounds that trained nothing
NO_REPORT = (k.STATUS_FAILED, k.STATUS_EXCLUDED)  # the only ones the server records with no figures (no reply)
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
    notes: tuple[str, ...] = ()  # checks that could not run, said aloud: a pass is then a pass of the others

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "clients": self.clients, "entries": self.entries,
                "violations": [asdict(v) | {"line": v.line()} for v in self.violations], "notes": list(self.notes)}


def verify_run(run_dir: Path) -> Verification:
    """Check RUN_DIR's privacy ledger against its config (raises FedtuneError if either is unreadable)."""
    run_dir = Path(run_dir)
    ledger = read_ledger(run_dir)
    cfg = read_run_config(run_dir)
    clients = ledger.clients  # read once: _Run names the entries of another run by identity
    run = _Run.of(ledger, cfg, clients, run_dir)
    violations = list(_of_the_run(ledger, cfg, run.dp_on))
    for name, rows in sorted(clients.items()):
        violations += list(_client(name, rows, run))
    if run.dp_on and cfg.dp.distributed_min_honest:
        violations += list(_one_sigma_a_round(clients, cfg.dp.distributed_min_honest, run.older))
    committed = _latest_committed_ledger(run_dir)
    violations += list(_committed_entries(committed, clients))
    notes = tuple(_committed_record_note(run_dir, committed, clients))
    violations += list(_client_level(ledger.client_level, cfg, ran=bool(clients), retried=_rounds_run_again(clients),
                                     committed=_committed_rounds(run_dir)))
    return Verification(len(clients), sum(len(rows) for rows in clients.values()), violations, notes)


@dataclass(frozen=True)
class _Run:
    """What every client's entries are checked against."""

    cfg: FedtuneConfig
    kind: str  # the ledger's accountant
    dp_on: bool
    run_id: str | None  # the run directory's run_id; None in one from before run ids
    sigma: float | None  # the σ every entry must carry, where the config fixes it (_fixed_sigma)
    another_runs: frozenset[int]  # id() of each entry that may be another run's spending (_older_late)

    @classmethod
    def of(cls, ledger: PrivacyLedger, cfg: FedtuneConfig, clients: dict[str, tuple[LedgerEntry, ...]],
           run_dir: Path) -> _Run:
        run_file = run_dir / k.RUN_ID_FILE  # read, never made here: verifying writes nothing
        run_id = run_file.read_text(encoding="utf-8").strip() if run_file.is_file() else None
        # A ledger and a config that disagree on DP are one violation (_of_the_run); the entries are then held to
        # dp-accounting's ε for their σ, the stricter check, not each read as "expected ∞".
        dp_on = ledger.dp_enabled or cfg.dp.enabled
        return cls(cfg, ledger.accountant, dp_on, run_id, _fixed_sigma(ledger, cfg), _older_late(clients))

    def older(self, row: LedgerEntry) -> bool:
        """Whether `row` may be another run's spending, at that run's schedule and δ (_older_late)."""
        return id(row) in self.another_runs


def _fixed_sigma(ledger: PrivacyLedger, cfg: FedtuneConfig) -> float | None:
    """dp.noise_multiplier where the config fixes σ: DP on (in the ledger and the config) and no target ε.
    Then every entry carries it, whatever its `policy`: a node policy changes σ only by lowering a target ε
    (policy.tighten, whose distributed-DP branch too needs a target), and `min-noise-multiplier` refuses a
    smaller σ rather than raising it (policy.refusal; a refusal reports the run's σ as well). So a node policy
    excuses no difference, and allowing a larger σ to entries whose policy names the node config would let
    an edited entry claim more noise, so a lower ε, by naming it. With a target each client solves its own σ
    (budget.py's client_dp; under distributed DP share_dp, one σ a round: _one_sigma_a_round), not checked here."""
    if not (ledger.dp_enabled and cfg.dp.enabled) or cfg.dp.target_epsilon > 0:
        return None
    return cfg.dp.noise_multiplier


def _older_late(clients: dict[str, tuple[LedgerEntry, ...]]) -> frozenset[int]:
    """The entries (by id) that may be another run's spending, at that run's round numbers, q, steps and δ:
    in a ledger written before client entries named their run (no entry names one), every entry recorded
    late (an older fedtune carried another run's spending from the institution's state directory into the
    ledger that way, with no failure before it). Once entries name their run, a client names it in every
    entry it reports late, and every late entry is this run's spending, checked as such: marking an entry
    late in such a ledger turns off no check. Only late entries name their run, so a ledger without one names
    none: an entry marked late there is exempt, and caught for the committed rounds by _committed_entries
    (the checkpoint's copy lacks the mark)."""
    if any(row.run is not None for rows in clients.values() for row in rows):
        return frozenset()
    return frozenset(id(row) for rows in clients.values() for row in rows if row.recorded_late)


def _of_the_run(ledger: PrivacyLedger, cfg: FedtuneConfig, dp_on: bool) -> Iterator[Violation]:
    """The ledger's own claims against the config: its unit, whether the run had DP, and distributed DP's
    accountant."""
    if ledger.unit != cfg.dp.unit:  # every ε below is of the config's unit: the ledger must claim that one
        yield Violation("ledger", None, "unit", f"{cfg.dp.unit} (the run's dp.unit)", ledger.unit)
    if ledger.dp_enabled != cfg.dp.enabled:
        yield Violation("ledger", None, "dp_enabled", f"{str(cfg.dp.enabled).lower()} (config.toml's dp.enabled)",
                        f"{str(ledger.dp_enabled).lower()}: the ledger and the config disagree on whether the clients "
                        "trained under DP, so the ledger is not of this config's run, or one of them was edited; no "
                        "ε in it can be taken as the run's")
    if dp_on and cfg.dp.distributed_min_honest and ledger.accountant != "skellam":
        yield Violation("ledger", None, "accountant", "skellam (distributed DP's integer shares; a ledger of "
                        "Gaussian shares is an earlier fedtune's, whose rounding was not proven against the "
                        "coordinator)", ledger.accountant)


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


def _committed_entries(committed: tuple[int, PrivacyLedger] | None,
                       clients: dict[str, tuple[LedgerEntry, ...]]) -> Iterator[Violation]:
    """Every entry of the ledger copy in the latest readable checkpoint (each commit saves the ledger with its
    round, server/run_dir.py's Checkpoint) is still in privacy_ledger.json, unchanged (_same): the spending of a
    committed round is only ever added to, never dropped or rewritten. An entry filed under a node's
    placeholder name may since have moved to its client (PrivacyLedger.attribute). A client dropped whole
    shows as each of its entries missing. `committed`: _latest_committed_ledger's."""
    if committed is None:
        return
    round_, saved = committed
    left = {name: [_same(row) for row in rows] for name, rows in clients.items()}
    # Named clients first: a placeholder's entry may match any client's, so it takes what they leave.
    for name, rows in sorted(saved.clients.items(), key=lambda item: (bool(PLACEHOLDER.fullmatch(item[0])), item[0])):
        for row in rows:
            holder = _holder(left, name, _same(row))
            if holder is not None:
                left[holder].remove(_same(row))
                continue
            spent = f" ({row.steps} steps, ε {_eps(row.epsilon)})" if row.reported else ""
            yield _Row(name, row)("entry", f"the {row.status} entry{spent} that checkpoints/round_{round_:04d}.pt "
                                  "holds, unchanged", "none alike in privacy_ledger.json: it was dropped or changed "
                                  f"after round {round_} was committed, so the ledger may understate what was spent; "
                                  "the checkpoint's copy is the committed record")


def _committed_record_note(run_dir: Path, committed: tuple[int, PrivacyLedger] | None,
                           clients: dict[str, tuple[LedgerEntry, ...]]) -> Iterator[str]:
    """What the committed-record check could not see: a ledger with entries beside no readable checkpoint
    (deleted, damaged, or from a fedtune that kept no ledger copy in them), or a newest checkpoint that did
    not load (an older one was read)."""
    found = _checkpoints(run_dir)
    if committed is None and any(clients.values()):
        yield ("The check that committed rounds' entries are unchanged did not run: the run directory holds no "
               "checkpoint (checkpoints/round_*.pt) with a ledger copy that loads, so a dropped or rewritten entry "
               "would go unseen.")
    elif committed is not None and found and committed[0] != found[-1][0]:
        yield (f"The newest checkpoint ({found[-1][1].name}) did not load, so committed entries were checked against "
               f"round {committed[0]}'s copy, the newest readable one.")


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of each checkpoints/round_*.pt, oldest first."""
    return sorted((int(re.findall(r"\d+", path.stem)[-1]), path)
                  for path in (run_dir / "checkpoints").glob("round_*.pt"))


def _latest_committed_ledger(run_dir: Path) -> tuple[int, PrivacyLedger] | None:
    """The round and ledger copy of the newest checkpoint that loads, falling back past damaged ones as a
    resume does (server/run_dir.py's resume_point; read here directly, since privacy/ imports nothing of
    server/: a checkpoint is a torch file of a dict with its `round` and `ledger`); None when there is none,
    none loads, or its copy is no ledger."""
    found = _checkpoints(run_dir)
    if not found:
        return None
    import torch  # only when there is a checkpoint to read

    for _, path in reversed(found):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return int(data["round"]), PrivacyLedger.from_dict(data["ledger"])
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the one before it stands, as on resume
            continue
    return None


def _same(row: LedgerEntry) -> tuple[str, ...]:
    """What of an entry never changes once its round is committed: its round, status, figures, reason, the
    policy it was trained under (the report words against whom the guarantee holds from it) and marks (not
    state_lost and its recomputation, which the server may add)."""
    return tuple(repr(getattr(row, field)) for field in _KEPT)


_KEPT = ("round", "status", "accountant", "num_examples", "noise_multiplier", "distributed_min_honest",
         "max_grad_norm", "sample_rate", "steps", "delta", "epsilon", "epsilon_other", "reason", "policy",
         "adopted_ledger_spending", "interrupted", "recorded_late", "recorded_round", "run")
PLACEHOLDER = re.compile(r"node-\d+")  # a node whose client was not known yet (server/rounds.py)


def _holder(left: dict[str, list[tuple[str, ...]]], name: str, same: tuple[str, ...]) -> str | None:
    """The client whose unmatched entries hold `same`: `name`, or for a placeholder any client."""
    if same in left.get(name, ()):
        return name
    if PLACEHOLDER.fullmatch(name):
        return next((other for other, kept in sorted(left.items()) if same in kept), None)
    return None


def _one_sigma_a_round(clients: dict[str, tuple[LedgerEntry, ...]], t: int,
                       older: Callable[[LedgerEntry], bool]) -> Iterator[Violation]:
    """Distributed DP: a round's sum carries σ only if every share in it is of that σ and of the run's t
    (docs/privacy.md, "One σ for every share"), and each client's ε is of its own σ. So in each round
    every entry's σ (noise-only shares too) must be the same, and each entry's t the run's (q is the
    run's schedule's, checked by _sampling). A coordinator that sent one institution a larger target ε than the others
    would show here: that institution's ε is of a σ the sum did not carry."""
    first: dict[tuple[int, bool], tuple[str, LedgerEntry]] = {}  # a round's (try's) first share, any status
    for name, rows in sorted(clients.items()):
        for row in rows:
            if row.noise_multiplier is None or older(row):
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


def _client(name: str, rows: tuple[LedgerEntry, ...], run: _Run) -> Iterator[Violation]:
    previous_round = -1
    for row in rows:  # every entry, the server's record of a failure or exclusion too
        bad = _Row(name, row)
        if row.ledger_round < previous_round:
            yield bad("round", f">= {previous_round} (entries in the order they were recorded)", row.ledger_round)
        previous_round = row.ledger_round
        yield from _status(bad, row, run.dp_on)
        yield from _entry(bad, row, run)
    yield from _epsilons(name, [row for row in rows if row.reported], run)


def _entry(bad: _Row, row: LedgerEntry, run: _Run) -> Iterator[Violation]:
    """One entry's figures: none missing that its status needs, its run, and unless it may be another run's
    spending (_older_late), the run's δ, σ and schedule."""
    missing = _missing(row)
    for field in missing:
        yield bad(field, NEEDED.get(field, "a number (a figure of a round that took steps)"), "null")
    if not row.reported:  # the server's record of a failure or exclusion: nothing reported to check
        return
    if row.run is not None and run.run_id is not None and row.run != run.run_id:
        yield bad("run", f"{run.run_id} (this run's id: a client reports late only this run's spending)", row.run)
    if not run.older(row):
        yield from _of_the_config(bad, row, run)
    if row.steps and not missing:
        yield from _sampling(bad, row, run)


NEEDED = {
    "epsilon": "a number (every entry but the server's record of a failure or exclusion is the client's own report, "
               "with its cumulative ε; an entry without one hides what its round cost)",
    "steps": "a number (a client reports its steps, 0 when it trained nothing; without those of a round that "
             "trained, what it spent cannot be recomputed)",
}


def _missing(row: LedgerEntry) -> list[str]:
    """The figures `row` lacks that its status needs: ε in every entry but the server's record of a failure or
    exclusion (a client that reported nothing; one that took steps says what they cost); steps in every report
    and every round that trained; σ, q and δ in a round that trained or took steps."""
    lacks = []
    if row.epsilon is None and (row.status not in NO_REPORT or row.steps):
        lacks.append("epsilon")
    if row.steps is None and (row.reported or row.status in TRAINED):
        lacks.append("steps")
    needs_figures = bool(row.steps) or row.status in TRAINED
    return lacks + [field for field in FIGURES if needs_figures and getattr(row, field) is None]


def _of_the_config(bad: _Row, row: LedgerEntry, run: _Run) -> Iterator[Violation]:
    """The entry's δ is config.toml's dp.delta, and its σ dp.noise_multiplier where that is fixed (_fixed_sigma)."""
    dp = run.cfg.dp
    if run.dp_on and row.delta is not None and not math.isclose(row.delta, dp.delta, rel_tol=1e-9):
        yield bad("delta", f"{dp.delta:g} (config.toml's dp.delta; the ledger's δ and the config's δ differ, so "
                  "this entry's ε is not of the run's δ and no guarantee of the run)", f"{row.delta:g}")
    sigma, found = run.sigma, row.noise_multiplier
    if sigma is not None and found is not None and not math.isclose(found, sigma, rel_tol=1e-9):
        why = ("more noise than the config sets, which no node policy adds: a σ above the one trained at "
               "understates ε" if found > sigma else "less noise than the config sets: the client did not train "
               "as the run asked, or the figure was edited")
        yield bad("noise_multiplier", f"{sigma:.6g} (config.toml's dp.noise_multiplier: without dp.target_epsilon "
                  "every client trains at it, whatever its node policy)", f"{found:.6g} ({why})")


def _epsilons(name: str, reported: list[LedgerEntry], run: _Run) -> Iterator[Violation]:
    """A client's reported ε: never decreasing, within the run's budget, and at least dp-accounting's for the
    spending up to it."""
    dp = run.cfg.dp
    cap = min(dp.epsilon_budget, dp.target_epsilon) if dp.target_epsilon > 0 else dp.epsilon_budget
    highest = 0.0
    for row in reported:
        bad, found = _Row(name, row), row.epsilon  # math.inf when unbounded
        if not row.recorded_late:  # one recorded late was spent before the entries recorded ahead of it
            if found < highest * (1 - 1e-9):
                yield bad("epsilon", f">= {highest:.4f} (a client's ε never decreases)", f"{found:.4f}")
            highest = max(highest, found)
        if found > cap * (1 + 1e-9) and row.status != k.STATUS_REFUSED:
            yield bad("epsilon", f"<= {cap:g} (the run's ε budget)", _eps(found))
    if not any(_missing(row) for row in reported):  # without them there is nothing to recompute ε from
        yield from _against_dp_accounting(name, spending_order(reported), run)


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


def _against_dp_accounting(name: str, order: list[LedgerEntry], run: _Run) -> Iterator[Violation]:
    """Each reported ε against dp-accounting's for the spending up to it. An entry that may be another
    run's (_older_late) is reported at that run's δ; the last spending a client reports is always this
    run's, so its final ε is checked at the run's δ."""
    delta = run.cfg.dp.delta
    history = [(row.noise_multiplier, row.sample_rate, row.steps) for row in order]
    deltas = [row.delta if run.older(row) else delta for row in order]
    expected = epsilons_along(run.kind, history, deltas) if run.dp_on else _without_dp(order)
    for row, independent in zip(order, expected, strict=True):
        if row.epsilon < independent * (1 - RELATIVE_SLACK) - ABSOLUTE_SLACK:
            yield _Row(name, row)("epsilon", f"{_eps(independent)} (dp-accounting, from the ledger's σ, q and "
                                             "steps)", _eps(row.epsilon))
    if run.dp_on and order and run.older(order[-1]) and order[-1].delta != delta:
        yield _Row(name, order[-1])("delta", f"{delta:g} (the run's δ: a client's last spending is this "
                                             "run's)", f"{order[-1].delta:g}")


def _without_dp(order: list[LedgerEntry]) -> list[float]:
    """Without DP, ε is ∞ from a client's first step on and 0 before it: an institution that refused a
    run without DP (require-dp) reports ε = 0, truly."""
    stepped, out = False, []
    for row in order:
        stepped = stepped or bool(row.steps)
        out.append(math.inf if stepped else 0.0)
    return out


class _Row:
    """Makes the Violations of one ledger entry."""

    def __init__(self, client: str, row: LedgerEntry) -> None:
        self.client, self.round = client, row.round

    def __call__(self, field: str, expected: Any, found: Any) -> Violation:
        return Violation(self.client, self.round, field, str(expected), str(found))


def _status(bad: _Row, row: LedgerEntry, dp_on: bool) -> Iterator[Violation]:
    status, steps = row.status, row.steps
    if status not in (*TRAINED, k.STATUS_FAILED, *NO_STEPS):
        yield bad("status", "trained, rejected, failed, declined, refused or excluded", status)
    elif status in NO_STEPS and steps:
        yield bad("steps", f"0 ({'an' if status[0] in 'aeiou' else 'a'} {status} round trains nothing)", steps)
    elif status in TRAINED and steps == 0:
        yield bad("steps", f"> 0 (a {status} round ran local training)", steps)
    if status == k.STATUS_REFUSED and not row.reason:
        yield bad("reason", "the institution's reason for refusing", "none")
    if dp_on and status in TRAINED and row.noise_multiplier and row.reported and math.isinf(row.epsilon):
        yield bad("epsilon", "a finite ε (the round trained with noise)", "null")


def _sampling(bad: _Row, row: LedgerEntry, run: _Run) -> Iterator[Violation]:
    """δ < 1/n, and q and the steps of this run's schedule; not the schedule for an entry that may be
    another run's spending (_older_late)."""
    cfg = run.cfg
    n = row.num_examples
    if not isinstance(n, int) or n <= 0:
        yield bad("num_examples", f"the client's {cfg.dp.unit} count (written by fedtune >= 0.2)", n)
        return
    if row.delta * n >= 1:
        yield bad("delta", f"< 1/n = {1 / n:.3g} (n = {n} {cfg.dp.unit}s)", f"{row.delta:g}")
    if run.older(row):
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
