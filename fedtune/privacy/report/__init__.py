"""The privacy report of a run: what was guaranteed, to whom, and under which assumptions.

Four parts, each with one job:
- numbers.py: `build_report(run_dir)` reads the run's ledger, config, verification and audit into
  typed numbers (`ReportData`, a `ClientRow` per institution); `ReportData.to_dict()` is
  privacy_report.json. The only part that reads files.
- prose.py (and evidence.py for the tables and checks): the report's sections as blocks, from the
  numbers, for a compliance reader first (a plain-language summary) and an engineer second.
- plot.py: `plot_epsilon(numbers)`, cumulative ε per institution as PNG bytes.
- render.py: Markdown and one self-contained HTML page from the blocks.
Nothing here writes a file: `report_contents` returns what the CLI writes (cli.py, atomically).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.privacy.report.numbers import (
    PLOT_PNG,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    AuditSummary,
    ClientRow,
    ReportData,
    Settings,
    build_report,
)
from fedtune.privacy.report.plot import plot_epsilon
from fedtune.privacy.report.prose import headline, sections, title
from fedtune.privacy.report.render import render_html, render_markdown

__all__ = ["PLOT_PNG", "REPORT_HTML", "REPORT_JSON", "REPORT_MD", "AuditSummary", "ClientRow", "ReportContents",
           "ReportData", "Settings", "build_report", "headline", "markdown", "plot_epsilon", "render_html",
           "render_markdown", "report_contents", "sections", "title"]


@dataclass(frozen=True)
class ReportContents:
    """The report's files, rendered: privacy_report.md, privacy_report.html and privacy_epsilon.png
    (privacy_report.json is `ReportData.to_dict()`)."""

    markdown: str
    html: str
    png: bytes


def markdown(report: ReportData) -> str:
    """The Markdown report of these numbers."""
    return render_markdown(title(report), sections(report))


def report_contents(report: ReportData) -> ReportContents:
    png = plot_epsilon(report)
    parts = sections(report)
    return ReportContents(render_markdown(title(report), parts), render_html(title(report), parts, png), png)
