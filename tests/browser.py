"""Open a report in headless Chromium (Debian's, never a downloaded one) and record what happens."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


#: flags for a headless Chromium that makes no request of its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


@dataclass
class PageVisit:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @property
    def network_requests(self) -> list[str]:
        """Requests that would leave the machine (anything but file:, data:, about:)."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", "about:"))]


def require_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return CHROMIUM


def visit(html_file: Path, screenshot: Path) -> PageVisit:
    from playwright.sync_api import sync_playwright

    exe = require_chromium()
    v = PageVisit()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: v.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: v.console_errors.append(str(e)))
        page.on("request", lambda r: v.requests.append(r.url))
        page.goto(html_file.resolve().as_uri(), wait_until="load")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return v
