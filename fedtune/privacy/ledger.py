"""The privacy ledger: per client and round, what was spent and under which parameters.

The server keeps it from what clients report, and writes it atomically after every round
to privacy_ledger.json, the record an auditor reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune import constants as k
from fedtune.durable import write_json_atomic
from fedtune.errors import FedtuneError
from fedtune.privacy.accountant import other
from fedtune.privacy.policy import SOURCES as POLICY_SOURCES

LEDGER = "privacy_ledger.json"  # in the run directory
UNIT = "one record of one institution (sample-level DP; add/remove-one neighbouring datasets)"


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isinf(value) or math.isnan(value) else float(value)


def ledger_entry(round_: int, status: str, metrics: Mapping[str, Any], accountant: str) -> dict[str, Any]:
    """One client's round as the ledger records it, from the metrics the client reports; the
    client keeps the same entry in its own state, the server in privacy_ledger.json."""
    return {
        "round": round_, "status": status, "num_examples": int(metrics[k.NUM_EXAMPLES]),
        "noise_multiplier": float(metrics[k.NOISE_MULTIPLIER]), "max_grad_norm": float(metrics[k.MAX_GRAD_NORM]),
        "sample_rate": float(metrics[k.SAMPLE_RATE]), "steps": int(metrics[k.STEPS]),
        "delta": float(metrics[k.DELTA]), "epsilon": _finite_or_none(float(metrics[k.EPSILON])),
        f"epsilon_{other(accountant)}": _finite_or_none(float(metrics[k.EPSILON_OTHER])),
    }


MAX_REASON = 500  # characters of a client's stated reason kept in an entry


def client_notes(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a reply's client record adds to its ledger entry: the reason it gave (refused, or failed
    after training; one line), whose privacy policy it applied, and an operator's reset."""
    notes: dict[str, Any] = {}
    reason = str(info.get(k.REASON, "")).strip()
    if reason:
        notes["reason"] = " ".join(reason.split())[:MAX_REASON]
    if info.get(k.POLICY) in POLICY_SOURCES:
        notes["policy"] = info[k.POLICY]
    if info.get(k.ADOPTED_LEDGER_SPENDING):
        notes["adopted_ledger_spending"] = True
    return notes


@dataclass
class PrivacyLedger:
    accountant: str
    dp_enabled: bool
    clients: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Client-level DP (one institution as a whole), privacy/client_level.py's ClientLevelAccount.to_dict();
    # None when the run has no client-level DP. Refreshed after every round.
    client_level: dict[str, Any] | None = None

    def record(self, client: str, entry: dict[str, Any]) -> None:
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in entry.items()}
        self.clients.setdefault(client, []).append(clean)

    def spent(self, client: str) -> list[tuple[float, float, int]]:
        """The (sigma, q, steps) runs of every entry of `client` that took DP-SGD steps, in order:
        trained, rejected, failed after training, and interrupted rounds all ran them."""
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.clients.get(client, [])
                if e.get("steps")]

    def epsilon_max(self) -> float | None:
        """Highest cumulative ε any client has spent so far (None when DP is off)."""
        if not self.dp_enabled:
            return None
        spent = [e["epsilon"] for entries in self.clients.values() for e in entries
                 if e.get("epsilon") is not None]
        return max(spent, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": UNIT, "accountant": self.accountant, "dp_enabled": self.dp_enabled,
                "clients": {name: list(entries) for name, entries in sorted(self.clients.items())},
                "client_level": None if self.client_level is None else dict(self.client_level)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        return cls(data["accountant"], data["dp_enabled"],
                   {name: list(entries) for name, entries in data["clients"].items()},
                   data.get("client_level"))  # absent in ledgers written before client-level DP

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())


def read_ledger(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR's privacy ledger as written (raises FedtuneError, saying what to do, if it is missing or damaged)."""
    if not run_dir.is_dir():
        raise FedtuneError(f"Run directory {run_dir} does not exist. Pass the directory that "
                           "`fedtune simulate` printed on its last line.")
    path = run_dir / LEDGER
    if not path.is_file():
        raise FedtuneError(f"{path} does not exist, so there is no privacy spending to report. Pass a run "
                           "directory made by `fedtune simulate` (it writes the ledger from round 0 on).")
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedtuneError(f"{path} is not valid JSON ({err}). Restore it from a backup: resuming the run cannot "
                           "rebuild it (the checkpoints hold only what was committed), and refuses to start.") from err
    missing = [key for key in ("accountant", "dp_enabled", "clients") if key not in ledger]
    if missing:
        raise FedtuneError(f"{path} is not a fedtune privacy ledger (no {', '.join(missing)}).")
    return ledger
