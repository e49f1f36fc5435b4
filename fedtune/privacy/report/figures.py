"""How a number is written in the report's text and plot: ∞ for INF, – for none."""

from __future__ import annotations

import math
from typing import Any

from fedtune.privacy.report.numbers import INF


def eps(value: float | str | None) -> str:
    """An ε to two decimals."""
    return "–" if value is None else "∞" if value == INF else f"{value:.2f}"


def g(value: Any) -> str:
    """Any figure: a float to four significant digits, the rest as it is."""
    return "–" if value is None else "∞" if value == INF else f"{value:.4g}" if isinstance(value, float) else str(value)


def ratio(epsilon: float) -> str:
    """The factor e^ε."""
    factor = math.exp(min(epsilon, 700.0))  # e^700 is near the largest float
    return f"{factor:.2f}" if factor < 10 else f"{factor:,.0f}" if factor < 1e6 else f"{factor:.1e}"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
