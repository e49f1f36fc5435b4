"""The privacy ledger: per client and round, what was spent and under which parameters.

The server keeps it from what clients report, and writes it atomically after every round
to privacy_ledger.json, the record an auditor reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.durable import write_json_atomic

UNIT = "one record of one institution (sample-level DP; add/remove-one neighbouring datasets)"


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isinf(value) or math.isnan(value) else float(value)


@dataclass
class PrivacyLedger:
    accountant: str
    dp_enabled: bool
    clients: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def record(self, client: str, entry: dict[str, Any]) -> None:
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in entry.items()}
        self.clients.setdefault(client, []).append(clean)

    def epsilon_max(self) -> float | None:
        """Highest cumulative ε any client has spent so far (None when DP is off)."""
        if not self.dp_enabled:
            return None
        spent = [e["epsilon"] for entries in self.clients.values() for e in entries
                 if e.get("epsilon") is not None]
        return max(spent, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": UNIT, "accountant": self.accountant, "dp_enabled": self.dp_enabled,
                "clients": {name: list(entries) for name, entries in sorted(self.clients.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        return cls(data["accountant"], data["dp_enabled"],
                   {name: list(entries) for name, entries in data["clients"].items()})

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())
