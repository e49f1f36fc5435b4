"""The report's blocks, and how they render: Markdown, and one self-contained HTML page.

The prose (prose.py) returns sections of blocks; these functions only format them. Both are pure:
they return strings and write nothing.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Plot:
    alt: str
    file: str  # the PNG beside the Markdown file; the HTML page embeds it instead


Block = str | list[str] | Table | Plot  # paragraph, bullet list, table, the ε plot
Section = tuple[str, list[Block]]  # a title and its blocks


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for heading, blocks in sections:
        parts.append(f"## {heading}")
        parts.extend(_md(block) for block in blocks)
    return "\n\n".join(parts) + "\n"


def _md(block: Block) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, list):
        return "\n".join(f"- {item}" for item in block)
    if isinstance(block, Plot):
        return f"![{block.alt}]({block.file})"
    cells = [block.header, ["---"] * len(block.header), *block.rows]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells)


def render_html(title: str, sections: list[Section], png_bytes: bytes) -> str:
    """One self-contained page: the same sections as the Markdown, the plot embedded as base64 PNG."""
    image = "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")
    body = [f"<h1>{_inline(title)}</h1>"]
    for heading, blocks in sections:
        body.append(f"<h2>{_inline(heading)}</h2>")
        body.extend(_html(block, image) for block in blocks)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
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
