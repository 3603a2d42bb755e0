"""Render an inversion: coloured tokens in the terminal (ANSI 24-bit) or as a standalone HTML page.

Blue = the query raises the token's probability, red = lowers it; strength = |difference|.
The ε line separates samples inside the preimage from those outside.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

from circuitkit.inversion.preimage import Inversion


def _rgb(c: float) -> tuple[int, int, int]:
    a = max(0.0, min(1.0, abs(c)))
    if c >= 0:  # white -> blue
        return int(255 * (1 - a)), int(255 * (1 - a)), 255
    return 255, int(255 * (1 - a)), int(255 * (1 - a))  # white -> red


def _tokens(inv: Inversion, row: dict, tokenizer) -> list[str]:
    return tokenizer.id_tokens(inv.ids[row["index"]].tolist())


def render_ansi(inv: Inversion, rows: Sequence[dict], colours, tokenizer, pad: str) -> str:
    lines = [f"site {inv.site}  metric {inv.metric}  ε = {inv.eps}"
             + (f"  input {inv.extra['input']!r}" if "input" in inv.extra else "")]
    drew_line = False
    for r in rows:
        if not r["in_eps"] and not drew_line:
            lines.append(f"{'─' * 10} ε = {inv.eps} {'─' * 10}")
            drew_line = True
        toks = _tokens(inv, r, tokenizer)
        cs = colours[r["index"]].tolist()
        parts = []
        for t, c in zip(toks, cs):
            if t == pad:
                break
            R, G, B = _rgb(c)
            parts.append(f"\x1b[48;2;{R};{G};{B}m\x1b[38;2;0;0;0m{t}\x1b[0m")
        lines.append(f"{r['distance']:7.4f}  " + "".join(parts))
    if not drew_line:
        lines.append(f"{'─' * 10} ε = {inv.eps} {'─' * 10}")
    return "\n".join(lines)


def render_html(inv: Inversion, rows: Sequence[dict], colours, tokenizer, pad: str) -> str:
    """The standalone HTML panel of an inversion (the report's InversionView panels, ``invert --html``)."""
    shown = [{**r, "tokens": _tokens(inv, r, tokenizer), "colours": colours[r["index"]].tolist()} for r in rows]
    return render_rows_html(f"{inv.site} — metric {inv.metric}", inv.eps, inv.extra.get("input"), shown, pad)


def render_rows_html(title: str, eps: float, query: str | None, rows: Sequence[dict], pad: str) -> str:
    """The panel from rows holding ``distance``, ``in_eps``, ``tokens`` and (optionally) ``colours``."""
    head = html.escape(f"site {title}, ε = {eps}" + (f" — input {query}" if query is not None else ""))
    body = []
    drew_line = False
    for r in rows:
        if not r["in_eps"] and not drew_line:
            body.append(f'<tr><td colspan="2" class="eps">ε = {eps}</td></tr>')
            drew_line = True
        cs = r.get("colours") or [0.0] * len(r["tokens"])
        spans = []
        for t, c in zip(r["tokens"], cs):
            if t == pad:
                break
            R, G, B = _rgb(c)
            spans.append(f'<span style="background:rgb({R},{G},{B})" title="{c:+.3f}">{html.escape(t)}</span>')
        body.append(f'<tr><td class="d">{r["distance"]:.4f}</td><td class="s">{"".join(spans)}</td></tr>')
    if not drew_line:
        body.append(f'<tr><td colspan="2" class="eps">ε = {eps}</td></tr>')
    return ("<!doctype html><html><head><meta charset='utf-8'><title>circuitkit invert</title><style>"
            "body{font-family:sans-serif}.s{font-family:monospace;font-size:15px}.d{color:#555;padding-right:1em}"
            "td.eps{border-top:2px dashed #c00;color:#c00;font-size:12px}</style></head><body>"
            f"<h3>{head}</h3><table>{''.join(body)}</table></body></html>\n")
