"""Render a Report as one self-contained HTML file: inline CSS, figures as data URIs, no scripts
that fetch anything, so it opens from disk with no network requests."""
from __future__ import annotations

import base64
import html
import re

from circuitkit.report.document import Figure, HtmlPanel, Report, Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{margin-bottom:0}.subtitle{color:#555;margin-top:.2em}
h2{border-bottom:2px solid #e3e3e3;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border:1px solid #d6d6d6;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f4f6}caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
nav ul{columns:2;font-size:.95em}
.ivpanel{max-height:480px;overflow:auto;border:1px solid #ddd;padding:.3em}
.ivpanel table{border:none;margin:0}.ivpanel td{border:none;padding:0 .5em 0 0}
.ivpanel .s{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;white-space:pre}
.ivpanel .d{color:#555}.ivpanel td.eps{border-top:2px dashed #c00;color:#c00;font-size:12px}
"""


def _inline(text: str) -> str:
    """Escape, then allow `code` and **bold** (the Markdown subset the report uses)."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _table(t: Table) -> str:
    head = "".join(f"<th>{_inline(str(h))}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(_fmt(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = f"<figcaption>{_inline(f.caption)}</figcaption>" if f.caption else ""
    return f'<figure><img alt="{html.escape(f.name)}" src="data:image/png;base64,{data}">{cap}</figure>'


def render_html(report: Report) -> str:
    parts = [f"<h1>{_inline(report.title)}</h1>"]
    if report.subtitle:
        parts.append(f'<p class="subtitle">{_inline(report.subtitle)}</p>')
    parts.append("<nav><ul>" + "".join(f'<li><a href="#s{i}">{_inline(s.title)}</a></li>'
                                       for i, s in enumerate(report.sections)) + "</ul></nav>")
    for i, s in enumerate(report.sections):
        parts.append(f'<section id="s{i}"><h2>{_inline(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_table(b))
            elif isinstance(b, Figure):
                parts.append(_figure(b))
            elif isinstance(b, HtmlPanel):
                parts.append(b.html)
            else:
                parts.extend(f"<p>{_inline(p)}</p>" for p in str(b).split("\n\n"))
        parts.append("</section>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(report.title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
