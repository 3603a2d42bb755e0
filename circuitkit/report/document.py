"""The report's document model: sections of prose, tables, figures and raw HTML panels.

Renderers (``html.py``, ``markdown.py``) turn one ``Report`` into both formats, so the two
files always say the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """Rows of cells under a header; ``caption`` is shown above it."""

    header: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    """A picture: PNG bytes (embedded as a data URI in HTML, written next to report.md)."""

    name: str  # file name stem, e.g. "patching_heatmap"
    png: bytes
    caption: str = ""


@dataclass
class Section:
    """A titled block; ``blocks`` hold str (Markdown-light prose), Table, Figure or HtmlPanel."""

    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, block: Any) -> Section:
        self.blocks.append(block)
        return self


@dataclass
class HtmlPanel:
    """Pre-rendered HTML (e.g. an InversionView panel); ``text`` is its Markdown fallback."""

    html: str
    text: str


@dataclass
class Report:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        s = Section(title)
        self.sections.append(s)
        return s
