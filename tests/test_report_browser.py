"""Reports open from disk in headless Chromium with no console errors and no network requests."""
from __future__ import annotations

from pathlib import Path

import pytest

from circuitkit.report.document import Figure, HtmlPanel, Report, Table
from circuitkit.report.figures import heatmap
from circuitkit.report.html import render_html
from tests.browser import visit

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def test_browser_detects_network_and_errors(tmp_path):
    """The harness itself must be able to fail: a page that fetches and throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img src='https://example.invalid/x.png'><script>throw new Error('x')</script>"
                   "</body></html>")
    v = visit(bad, tmp_path / "bad.png")
    assert v.network_requests and v.console_errors


def test_rendered_report_is_clean(tmp_path):
    r = Report("Browser check")
    s = r.section("Figures")
    s.add(Table(["a", "b"], [[1, 2.5]]))
    s.add(Figure("h", heatmap([[0.5, -0.2]], ["x"], ["p", "q"], "heat"), "caption"))
    s.add(HtmlPanel('<iframe sandbox srcdoc="&lt;p&gt;panel&lt;/p&gt;"></iframe>', "panel"))
    page = tmp_path / "index.html"
    page.write_text(render_html(r))
    v = visit(page, tmp_path / "shot.png")
    assert v.console_errors == [] and v.network_requests == []
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("index", sorted(REPORTS.glob("*/index.html")), ids=lambda p: p.parent.name)
def test_committed_reports_open_cleanly(index, tmp_path):
    v = visit(index, tmp_path / f"{index.parent.name}.png")
    assert v.console_errors == [], v.console_errors
    assert v.network_requests == [], v.network_requests
