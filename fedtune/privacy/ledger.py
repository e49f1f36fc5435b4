"""The privacy ledger: per client and round, what was spent and under which parameters.

privacy_ledger.json, in the run directory, is the record an auditor reads. This module owns it:
its entries (LedgerEntry), the ways the server records them (the PrivacyLedger.record_* methods),
and the one way to read and write the file (PrivacyLedger.load / save, atomic). Every reader goes
through them: the server when it resumes, the privacy report, `fedtune privacy-verify`, the audit,
and deployment's refusal message. Each client keeps its own entries, of the same type
(client/state.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune import constants as k
from fedtune.durable import write_json_atomic
from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.accountant import History, other
from fedtune.privacy.policy import SOURCES as POLICY_SOURCES

LEDGER = "privacy_ledger.json"  # in the run directory
# What one client's (ε, δ) protects (dp.unit): `record`, adding or removing one record; `user`, adding or
# removing one user with all of their records. Ledgers before dp.unit existed described `record` in words.
UNITS = ("record", "user")
OLD_RECORD_UNIT = "one record of one institution (sample-level DP; add/remove-one neighbouring datasets)"
MAX_REASON = 500  # characters of a client's stated reason kept in an entry
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour codes, as Ray's tracebacks carry them


def one_line(reason: str) -> str:
    """A failure reason as the ledger keeps it: without colour codes, and of a multi-line text (a
    traceback) only its last line, the exception itself; at most MAX_REASON characters."""
    lines = [" ".join(line.split()) for line in ANSI.sub("", reason).splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else "")[:MAX_REASON]


@dataclass(frozen=True)
class LedgerEntry:
    """One client's round as the ledger records it.

    On disk (to_dict) the fields keep the names fedtune has always written, and a figure or note
    that does not apply is left out; from_dict reads every earlier fedtune's entries (a figure
    they lack is None)."""

    round: int
    status: str  # k.STATUS_*
    # The accountant `epsilon` comes from (`epsilon_other` comes from the other one); None when the
    # entry does not say and nobody told from_dict.
    accountant: str | None = None
    # What the client reported. None: not reported (a failure or exclusion the server recorded
    # for a client that did not answer, or a ledger written before the figure existed).
    num_examples: int | None = None  # n: the client's count of the ledger's unit (records, or users)
    noise_multiplier: float | None = None  # σ
    # Distributed DP: σ is the std the sum of the round's shares carries when at least this many
    # institutions added theirs (the client itself added σ/√t). None: the client added all of σ.
    distributed_min_honest: int | None = None
    max_grad_norm: float | None = None  # C
    sample_rate: float | None = None  # q
    steps: int | None = None  # DP-SGD steps taken this round
    delta: float | None = None  # δ
    epsilon: float | None = None  # cumulative ε after this round; math.inf when unbounded (null on disk)
    epsilon_other: float | None = None  # the same from the other accountant
    # Notes.
    reason: str | None = None  # why it refused, failed, was rejected or was excluded (one line)
    policy: str | None = None  # whose privacy policy the client applied (privacy/policy.py)
    adopted_ledger_spending: bool = False  # its operator continued from the ledger's record after a lost state
    state_lost: bool = False  # the ε it reported is below the ledger's own recomputation (server/spending.py)
    epsilon_recomputed: float | None = None  # that recomputation
    interrupted: bool = False  # reported in a round that was never committed: the spending still counts
    # Reported by the client after the fact (PrivacyLedger.record_late): this run's spending the server
    # had no record of, from a reply it never got (a crash during training); in ledgers written before
    # client entries named their `run`, possibly another run's. Its steps count like any other.
    recorded_late: bool = False
    recorded_round: int | None = None  # the server round it was recorded in, when that is not `round` (late ones)
    run: str | None = None  # in a client's own entries: the id of the run it was spent in (RunDirectory.run_id)
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as found

    @classmethod
    def from_report(cls, round_: int, status: str, metrics: Mapping[str, Any], accountant: str, *,
                    reason: str | None = None, policy: str | None = None,
                    adopted_ledger_spending: bool = False, run: str | None = None) -> LedgerEntry:
        """The entry for the privacy figures a client reports (its reply's metrics); the client
        keeps the same entry in its own state (with the `run` it was spent in), the server in
        privacy_ledger.json."""
        return cls(round_, status, accountant, num_examples=int(metrics[k.NUM_EXAMPLES]),
                   noise_multiplier=_finite(metrics[k.NOISE_MULTIPLIER]),
                   max_grad_norm=_finite(metrics[k.MAX_GRAD_NORM]),
                   sample_rate=_finite(metrics[k.SAMPLE_RATE]), steps=int(metrics[k.STEPS]),
                   delta=_finite(metrics[k.DELTA]), epsilon=_epsilon(metrics[k.EPSILON]),
                   epsilon_other=_epsilon(metrics[k.EPSILON_OTHER]), reason=reason or None, policy=policy,
                   adopted_ledger_spending=adopted_ledger_spending, run=run,
                   distributed_min_honest=int(metrics[k.DISTRIBUTED_MIN_HONEST])
                   if metrics.get(k.DISTRIBUTED_MIN_HONEST) else None)

    @property
    def ledger_round(self) -> int:
        """The server round this entry was recorded in: `round`, or recorded_round for one recorded
        late (whose `round` is the one it was spent in, possibly another run's)."""
        return self.recorded_round if self.recorded_late and self.recorded_round is not None else self.round

    @property
    def reported(self) -> bool:
        """The client reported its privacy figures this round (every entry but the server's
        record of a failure or exclusion)."""
        return self.epsilon is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "status": self.status}
        for key in _FIGURES:
            value = getattr(self, key)
            if value is not None:
                out[key] = _on_disk(value)
        if self.epsilon_other is not None:
            if self.accountant is None:
                raise ValueError("an entry with epsilon_other must name its accountant")
            out[f"epsilon_{other(self.accountant)}"] = _on_disk(self.epsilon_other)
        for key in _NOTES:
            value = getattr(self, key)
            if value:  # None and False are left out, as fedtune has always written entries
                out[key] = _on_disk(value)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], accountant: str | None = None) -> LedgerEntry:
        """An entry as to_dict (or any earlier fedtune) wrote it. `accountant`: the ledger's, for an
        entry that does not name the other accountant's ε. Raises TypeError or KeyError on one
        that is not an entry."""
        if not isinstance(data, Mapping):
            raise TypeError(f"an entry must be a JSON object, not {type(data).__name__}")
        rest = dict(data)
        own = next((name for name in ("prv", "rdp", "skellam") if f"epsilon_{other(name)}" in rest), accountant)
        values: dict[str, Any] = {
            "round": _integer(rest.pop("round"), "round", required=True),
            "status": _text(rest.pop("status"), "status", required=True),
            "accountant": own,
            "epsilon": _epsilon(rest.pop("epsilon")) if "epsilon" in rest else None,
            "epsilon_other": (_epsilon(rest.pop(f"epsilon_{other(own)}"))
                              if own is not None and f"epsilon_{other(own)}" in rest else None)}
        for key in ("num_examples", "steps", "recorded_round", "distributed_min_honest"):
            values[key] = _integer(rest.pop(key, None), key)
        for key in ("noise_multiplier", "max_grad_norm", "sample_rate", "delta"):
            values[key] = _number(rest.pop(key, None), key)
        # written as null when ∞ (a history no accountant could evaluate, server/spending.py), like an ε
        values["epsilon_recomputed"] = (_epsilon(rest.pop("epsilon_recomputed"))
                                        if "epsilon_recomputed" in rest else None)
        for key in ("reason", "policy", "run"):
            values[key] = _text(rest.pop(key, None), key)
        for key in ("adopted_ledger_spending", "state_lost", "interrupted", "recorded_late"):
            values[key] = bool(rest.pop(key, False))  # the client wrote adopted_ledger_spending as 1
        _check_ranges(values)
        return cls(**values, extra=rest)


def _check_ranges(values: Mapping[str, Any]) -> None:
    """Raise ValueError on a figure no fedtune writes (an accountant would raise on it, or divide by it):
    counts below 0, σ or C negative or not finite, q outside [0, 1], δ outside [0, 1), and δ = 0 on an entry
    with noised steps (whose ε needs a δ > 0)."""
    for key in ("round", "num_examples", "steps", "recorded_round", "distributed_min_honest"):
        if values[key] is not None and values[key] < 0:
            raise ValueError(f"{key} is {values[key]}, below 0")
    for key in ("noise_multiplier", "max_grad_norm"):
        if values[key] is not None and not 0 <= values[key] < math.inf:
            raise ValueError(f"{key} is {values[key]}, not a finite number >= 0")
    if values["sample_rate"] is not None and not 0 <= values["sample_rate"] <= 1:
        raise ValueError(f"sample_rate is {values['sample_rate']}, not a probability")
    delta = values["delta"]
    if delta is not None and (not 0 <= delta < 1 or (delta == 0 and values["steps"] and values["noise_multiplier"])):
        raise ValueError(f"delta is {delta}, not in (0, 1)")


_FIGURES = ("num_examples", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "delta", "epsilon",
            "distributed_min_honest")
_NOTES = ("reason", "policy", "adopted_ledger_spending", "state_lost", "epsilon_recomputed", "interrupted",
          "recorded_late", "recorded_round", "run")


def client_notes(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a reply's client record adds to its ledger entry (LedgerEntry.from_report's keywords):
    the reason it gave (refused, or failed after training; one line), whose privacy policy it
    applied, and an operator's reset."""
    reason = " ".join(str(info.get(k.REASON, "")).split())[:MAX_REASON]
    return {"reason": reason or None, "policy": info[k.POLICY] if info.get(k.POLICY) in POLICY_SOURCES else None,
            "adopted_ledger_spending": bool(info.get(k.ADOPTED_LEDGER_SPENDING))}


class PrivacyLedger:
    """Every client's entries, in the order recorded, and the run's client-level account.

    Only this class changes the entries, through methods named for what they record; readers get
    copies (`clients`, `entries`)."""

    def __init__(self, accountant: str, dp_enabled: bool, clients: Mapping[str, Iterable[LedgerEntry]] | None = None,
                 client_level: Mapping[str, Any] | None = None, unit: str = "record") -> None:
        self.accountant = accountant
        self.dp_enabled = dp_enabled
        self.unit = unit
        self._clients = {name: list(entries) for name, entries in (clients or {}).items()}
        if any(not isinstance(e, LedgerEntry) for entries in self._clients.values() for e in entries):
            raise TypeError("a ledger holds LedgerEntry objects (LedgerEntry.from_dict reads one written as JSON)")
        # Client-level DP (one institution as a whole), privacy/client_level.py's ClientLevelAccount.to_dict();
        # None when the run has no client-level DP.
        self._client_level = None if client_level is None else dict(client_level)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def clients(self) -> dict[str, tuple[LedgerEntry, ...]]:
        """Each client's entries, by name (a copy)."""
        return {name: tuple(entries) for name, entries in self._clients.items()}

    def entries(self, client: str) -> tuple[LedgerEntry, ...]:
        return tuple(self._clients.get(client, ()))

    @property
    def client_level(self) -> dict[str, Any] | None:
        return None if self._client_level is None else dict(self._client_level)

    def spent(self, client: str) -> History:
        """The (sigma, q, steps) runs of every entry of `client` that took DP-SGD steps, in order:
        trained, rejected, failed after training, and interrupted rounds all ran them."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self._clients.get(client, []) if e.steps]

    def epsilon_of(self, client: str) -> float:
        """The most any of `client`'s entries shows spent: its reported cumulative ε, or the server's
        recomputation where it reported less after losing its state (math.inf once it trained without noise)."""
        return max((x for e in self._clients.get(client, ()) for x in (e.epsilon, e.epsilon_recomputed)
                    if x is not None), default=0.0)

    def epsilon_max(self) -> float | None:
        """Highest cumulative ε any client has spent so far (None when DP is off; epsilon_of): math.inf
        once any client trained without noise (σ = 0), so no figure ever understates what was spent."""
        if not self.dp_enabled:
            return None
        return max((self.epsilon_of(client) for client in self._clients), default=0.0)

    def __eq__(self, other_: object) -> bool:
        if not isinstance(other_, PrivacyLedger):
            return NotImplemented
        return (self.accountant, self.dp_enabled, self.unit, self._clients, self._client_level) == \
            (other_.accountant, other_.dp_enabled, other_.unit, other_._clients, other_._client_level)

    __hash__ = None  # mutable

    # ---- recording ----------------------------------------------------------------------------
    def record_round(self, client: str, round_: int, status: str, metrics: Mapping[str, Any], *,
                     reason: str | None = None, policy: str | None = None,
                     adopted_ledger_spending: bool = False) -> LedgerEntry:
        """A round whose privacy figures `client` reported (`metrics`): trained, declined, refused, failed
        after training, or rejected by the server after it trained (then `reason` says why)."""
        entry = LedgerEntry.from_report(round_, status, metrics, self.accountant, reason=reason, policy=policy,
                                        adopted_ledger_spending=adopted_ledger_spending)
        self._append(client, entry)
        return entry

    def record_late(self, client: str, round_: int, entries: Iterable[LedgerEntry]) -> None:
        """Entries `client` reports in `round_` for spending this ledger has no record of
        (client/state.py's `unrecorded`; checked by server/rounds.py's unrecorded_entries): each kept
        as the client wrote it, marked recorded_late and with the round it was recorded in, so that
        the steps on record add up to what the client spent. The marks only the server sets (state_lost
        and its recomputation, interrupted) are not taken from the client, nor
        a policy fedtune does not name (the report words "against whom" from it), nor keys it does not
        know."""
        for entry in entries:
            self._append(client, dataclasses.replace(
                entry, accountant=entry.accountant or self.accountant, reason=one_line(entry.reason or "") or None,
                recorded_late=True, recorded_round=round_, state_lost=False, epsilon_recomputed=None,
                interrupted=False, extra={},
                policy=entry.policy if entry.policy in POLICY_SOURCES else None))

    def rounds_held(self, client: str) -> list[tuple[int, int]]:
        """(round, steps) of each entry of `client` that took steps: what the client compares its own
        entries with to find spending this ledger lacks (client/state.py's `unrecorded`)."""
        return [(e.round, e.steps) for e in self._clients.get(client, []) if e.steps]

    def record_failure(self, client: str, round_: int, reason: str) -> None:
        """`client` did not answer `round_` (no reply, an error reply, a reply refused before its
        figures could be read), for `reason`: it reported nothing."""
        self._append(client, LedgerEntry(round_, k.STATUS_FAILED, self.accountant, reason=one_line(reason)))

    def record_exclusion(self, client: str, round_: int, reason: str) -> None:
        """`client` was not asked to train in `round_`, for `reason` (server/identity.py)."""
        self._append(client, LedgerEntry(round_, k.STATUS_EXCLUDED, self.accountant, reason=reason))

    def attribute(self, placeholder: str, client: str) -> None:
        """Entries recorded under `placeholder` (a node whose client was not known yet) are
        `client`'s: they join its entries, in round order."""
        if placeholder in self._clients and placeholder != client:
            moved = [*self._clients.pop(placeholder), *self._clients.get(client, [])]
            self._clients[client] = sorted(moved, key=lambda e: e.ledger_round)

    def mark_state_lost(self, client: str, round_: int, recomputed: float) -> None:
        """`client`'s reported ε in `round_` is below `recomputed`, the ledger's own figure for its
        history (server/spending.py): its privacy state was lost."""
        entries = self._clients.get(client, [])
        at = next(i for i in reversed(range(len(entries))) if entries[i].round == round_ and entries[i].reported)
        entries[at] = dataclasses.replace(entries[at], state_lost=True, epsilon_recomputed=recomputed)

    def record_interrupted(self, written: PrivacyLedger, committed_round: int) -> None:
        """Resuming after `committed_round`: every entry of `written` (the ledger on disk) from a later
        round, which never finished, is kept and marked interrupted, since the clients spent that
        budget; so is its client-level account, if it counts more noised releases. So is spending
        recorded late in `committed_round` itself that this ledger lacks: what the server asks for after
        the last round (server/rounds.py::_record_unreported) is saved before the checkpoint is
        written again, and a crash between the two leaves it in the file only."""
        for client, entries in written._clients.items():
            held = list(self._clients.get(client, ()))
            for entry in entries:
                later = entry.ledger_round > committed_round
                after_commit = entry.recorded_late and entry.recorded_round == committed_round and entry not in held
                if later or after_commit:
                    self._append(client, dataclasses.replace(entry, interrupted=True))
        mine = (self._client_level or {}).get("rounds", 0)
        if written._client_level and written._client_level["rounds"] > mine:
            self._client_level = dict(written._client_level)

    def record_client_level(self, account: Mapping[str, Any]) -> None:
        """The client-level account after a round's noised release (strategies/client_dp.py)."""
        self._client_level = dict(account)

    def _append(self, client: str, entry: LedgerEntry) -> None:
        self._clients.setdefault(client, []).append(entry)

    # ---- the file -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "accountant": self.accountant, "dp_enabled": self.dp_enabled,
                "clients": {name: [e.to_dict() for e in entries] for name, entries in sorted(self._clients.items())},
                "client_level": self.client_level}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """A ledger as to_dict (or any earlier fedtune) wrote it; raises KeyError, TypeError or
        ValueError on anything else."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a ledger must be a JSON object, not {type(data).__name__}")
        accountant, clients = _text(data["accountant"], "accountant", required=True), data["clients"]
        if not isinstance(data["dp_enabled"], bool) or not isinstance(clients, Mapping):
            raise TypeError("dp_enabled must be true or false, and clients an object of entry lists")
        if any(not isinstance(rows, list) for rows in clients.values()):
            raise TypeError("each client's entries must be a list")
        client_level = data.get("client_level")  # absent in ledgers written before client-level DP
        if client_level is not None and not isinstance(client_level, Mapping):
            raise TypeError("client_level must be an object or null")
        entries = {str(name): [LedgerEntry.from_dict(e, accountant) for e in rows] for name, rows in clients.items()}
        unit = data.get("unit", OLD_RECORD_UNIT)
        unit = "record" if unit == OLD_RECORD_UNIT else unit
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, not {unit!r}")
        return cls(accountant, data["dp_enabled"], entries, client_level, unit)

    @classmethod
    def load(cls, run_dir: Path) -> PrivacyLedger | None:
        """RUN_DIR's ledger, or None if there is none yet. A damaged one raises ConfigError and is
        left as it is: unlike a checkpoint it is never replaced by an older copy, which would forget
        spending."""
        path = Path(run_dir) / LEDGER
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON and Unicode errors are ValueErrors
            raise ConfigError(f"{path} is damaged ({type(err).__name__}: {_first_line(err)}), so the spending it "
                              "records cannot be recovered (the checkpoints hold only what was committed), and "
                              "resuming or reporting from it could undercount it. Restore it from a backup; nothing "
                              "was changed.") from err

    def save(self, run_dir: Path) -> None:
        """Write RUN_DIR's ledger atomically (fedtune/durable.py): a crash leaves the old one or this one."""
        write_json_atomic(Path(run_dir) / LEDGER, self.to_dict())


def epsilon_for_json(value: float | None) -> float | str | None:
    """An ε as fedtune's JSON files write it: "inf" when unbounded, so that it is never mistaken for
    null, which means DP off (JSON has no infinity)."""
    return "inf" if value is not None and math.isinf(value) else value


def read_ledger(run_dir: Path) -> PrivacyLedger:
    """RUN_DIR's ledger, for a reader that needs one (the report, the verifier, the audit): raises
    FedtuneError, saying what to do, when there is none, and ConfigError when it is damaged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise FedtuneError(f"{run_dir} {what}. Pass the run directory that `fedtune simulate` printed on its "
                           "last line.")
    ledger = PrivacyLedger.load(run_dir)
    if ledger is None:
        raise FedtuneError(f"{run_dir / LEDGER} does not exist, so there is no privacy spending to report. Pass a "
                           "run directory made by `fedtune simulate` (it writes the ledger from round 0 on).")
    return ledger


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _epsilon(value: Any) -> float:
    """A reported ε: null, ∞ and NaN are all unbounded (math.inf)."""
    if value is None:
        return math.inf
    value = _number(value, "epsilon")
    return value if math.isfinite(value) else math.inf


def _on_disk(value: Any) -> Any:
    """JSON as the ledger has always been written: a non-finite number is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number, not {value!r}")
    return float(value)


def _integer(value: Any, key: str, required: bool = False) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        raise TypeError(f"{key} must be a whole number, not {value!r}")
    return int(value)


def _text(value: Any, key: str, required: bool = False) -> str | None:
    if (value is not None or required) and not isinstance(value, str):
        raise TypeError(f"{key} must be a string, not {value!r}")
    return value


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else "empty"
