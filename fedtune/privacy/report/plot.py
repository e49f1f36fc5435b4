"""The report's plot: cumulative ε per institution and round, as PNG bytes."""

from __future__ import annotations

import io
import math
import statistics

from fedtune.privacy.report.figures import g
from fedtune.privacy.report.numbers import INF, ReportData, as_float

MANY_CLIENTS = 20  # above this the plot shows the max/median/min envelope and the top clients
TOP_CLIENTS = 5


def plot_epsilon(report: ReportData) -> bytes:
    """PNG of cumulative ε against round: a line per client, or an envelope when there are many."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    clients, rounds = report.clients, list(range(report.rounds_in_ledger + 1))
    if not report.dp_enabled:
        ax.text(0.5, 0.5, "DP-SGD was off: no formal guarantee (ε = ∞)", ha="center", va="center",
                transform=ax.transAxes, fontsize=13)
    elif len(clients) > MANY_CLIENTS:
        curves = [[_plottable(v) for v in c.epsilon_by_round] for c in clients]
        by_round = list(zip(*curves, strict=True))
        ax.fill_between(rounds, [min(v) for v in by_round], [max(v) for v in by_round], alpha=0.2,
                        label=f"range over {len(clients)} institutions")
        for label, stat, style in (("max", max, "-"), ("median", statistics.median, "--"), ("min", min, ":")):
            ax.plot(rounds, [stat(v) for v in by_round], style, color="black", label=label)
        for c in sorted(clients, key=lambda c: as_float(c.epsilon), reverse=True)[:TOP_CLIENTS]:
            ax.plot(rounds, [_plottable(v) for v in c.epsilon_by_round], marker=".", lw=1, label=c.name)
    else:
        for c in clients:
            ax.plot(rounds, [_plottable(v) for v in c.epsilon_by_round], marker="o", label=c.name)
    if report.dp_enabled and report.epsilon_budget not in (INF, None):
        ax.axhline(report.epsilon_budget, color="tab:red", ls="--", label=f"budget ε = {report.epsilon_budget:g}")
    accountant = report.accountant.name.upper()
    ax.set(xlabel="round", ylabel="cumulative ε", title=f"ε per institution ({accountant}, δ = {g(report.delta)})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=2 if len(ax.get_legend_handles_labels()[0]) > 8 else 1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plottable(value: float | str) -> float:
    return math.nan if value == INF else value  # an infinite ε leaves a gap, it cannot be drawn
