"""Regenerate docs/explorer.png: the explorer on the committed addition model and decoder, after sampling the
preimage of a1.1 at '=' on B615+861=1476E (headless Debian Chromium; nothing leaves the machine).

    .venv/bin/python docs/screenshot_explorer.py [--out docs/explorer.png]

Also prints how long the server took from start to its first answer (the issue asks for under 60 s).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"))
    ap.add_argument("--decoder", default=str(ROOT / "case_studies" / "models" / "addition_decoder"))
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("Chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    cmd = [sys.executable, "-m", "circuitkit.cli", "serve", str(ROOT / "case_studies" / "models" / "addition"),
           "--decoder", args.decoder, "--case", str(ROOT / "reports" / "addition"), "--port", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", proc.stdout.readline()).group(1)
        urllib.request.urlopen(url + "api/info", timeout=60).read()
        print(f"server answered {time.perf_counter() - t0:.1f} s after start")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url, wait_until="load")
            page.fill("#input", "B615+861=1476E")
            page.click("#analyse")
            page.wait_for_function("document.querySelectorAll('.tok').length === 14")
            page.click(".tok[data-pos='8']")
            page.select_option("#site", "a1.1")
            page.click("#sample")
            page.wait_for_selector("#results tr.sample", timeout=120_000)
            page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": 1280, "height": 1100})
            browser.close()
        print(f"wrote {args.out}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
