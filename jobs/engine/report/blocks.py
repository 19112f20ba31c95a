"""The report's building blocks and their rendering: markdown (report.md) and one HTML page (report.html).

A report is a list of :data:`Block` — :class:`Heading`, :class:`Paragraph`, :class:`BulletList`,
:class:`Table`, :class:`Image` — built by :mod:`jobs.engine.report.sections`. Each block renders itself
(``to_markdown()``, ``to_html(images)``), so a new kind of block is one class, not a branch in each
renderer. Table cells are strings; ``_num`` formats the numbers that go into them.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _num(x: Any, kind: str = "f4") -> str:
    """A number as a table cell: ``-`` for None/NaN, else in ``kind``'s format (``int`` and others: ``str``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "f2":
        return f"{x:.2f}"
    if kind == "f3":
        return f"{x:.3f}"
    if kind == "f4":
        return f"{x:.4f}"
    if kind == "g3":
        return f"{x:.3g}"
    if kind == "params":
        return f"{x / 1e6:.3f}M"
    if kind == "s":
        return f"{x:.1f}"
    if kind == "h":
        return f"{x:.4f}" if x < 10 else f"{x:.1f}"
    return str(x)


@dataclass(frozen=True)
class Heading:
    """``#``-heading of ``level`` 1-6."""

    level: int
    text: str

    def to_markdown(self) -> str:
        return "#" * self.level + " " + self.text

    def to_html(self, images: Mapping[str, bytes]) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class Paragraph:
    """One paragraph of plain text (escaped in HTML, written as it is in markdown)."""

    text: str

    def to_markdown(self) -> str:
        return self.text

    def to_html(self, images: Mapping[str, bytes]) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass(frozen=True)
class BulletList:
    """An unordered list, one item per line."""

    items: Sequence[str]

    def to_markdown(self) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def to_html(self, images: Mapping[str, bytes]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in self.items) + "</ul>"


@dataclass(frozen=True)
class Table:
    """A table: column names ``head`` and ``rows`` of string cells."""

    head: Sequence[str]
    rows: Sequence[Sequence[str]]

    def to_markdown(self) -> str:
        return markdown_table(self.head, self.rows)

    def to_html(self, images: Mapping[str, bytes]) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in self.head)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


@dataclass(frozen=True)
class Image:
    """A PNG at ``path`` relative to the report (``plots/*.png``), captioned ``alt``."""

    path: str
    alt: str

    def to_markdown(self) -> str:
        return f"![{self.alt}]({self.path})"

    def to_html(self, images: Mapping[str, bytes]) -> str:
        """Embedded as base64 when ``images`` holds the path's bytes, else linked."""
        data = images.get(self.path)
        src = f"data:image/png;base64,{base64.b64encode(data).decode()}" if data is not None else html.escape(self.path)
        alt = html.escape(self.alt)
        return f'<figure><img src="{src}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


Block = Heading | Paragraph | BulletList | Table | Image


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown of :func:`~jobs.engine.report.sections.report_blocks`; images link ``plots/*.png``."""
    return "\n\n".join(b.to_markdown() for b in blocks) + "\n"


def render_html(blocks: Sequence[Block], images: Mapping[str, bytes] | None = None) -> str:
    """One self-contained HTML page: the PNGs in ``images`` (path → bytes) are embedded as base64."""
    images = images or {}
    body = [b.to_html(images) for b in blocks]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:100%}table{border-collapse:collapse;margin:1em 0;"
        "font-size:13px}th,td{border:1px solid #bbb;padding:3px 6px;text-align:left}th{background:#eee}"
        "img{max-width:900px}figure{margin:1em 0}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>GrowCLIP run report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
