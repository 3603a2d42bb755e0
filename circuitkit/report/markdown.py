"""Render a Report as Markdown; figures are written as PNG files next to report.md."""
from __future__ import annotations

from circuitkit.report.document import Figure, HtmlPanel, Report, Table


def _cell(c: object) -> str:
    s = f"{c:.4g}" if isinstance(c, float) else str(c)
    return s.replace("|", "\\|").replace("\n", " ")


def _table(t: Table) -> str:
    lines = [f"**{t.caption}**", ""] if t.caption else []
    lines.append("| " + " | ".join(_cell(h) for h in t.header) + " |")
    lines.append("|" + "---|" * len(t.header))
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(report: Report, figure_dir: str = "figures") -> tuple[str, dict[str, bytes]]:
    """Markdown text and the figure files it links to ({relative path: PNG bytes})."""
    out = [f"# {report.title}", ""]
    if report.subtitle:
        out += [f"_{report.subtitle}_", ""]
    files: dict[str, bytes] = {}
    for s in report.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [_table(b), ""]
            elif isinstance(b, Figure):
                rel = f"{figure_dir}/{b.name}.png"
                files[rel] = b.png
                out += [f"![{b.caption or b.name}]({rel})", ""]
                if b.caption:
                    out += [f"_{b.caption}_", ""]
            elif isinstance(b, HtmlPanel):
                out += [b.text, ""]
            else:
                out += [str(b), ""]
    return "\n".join(out).rstrip() + "\n", files
