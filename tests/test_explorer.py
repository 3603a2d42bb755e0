"""The live explorer: `circuitkit serve` on the committed addition model, driven by headless Chromium
(type an input, click a token, pick a site, sample), plus its HTTP answers to bad and concurrent requests."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.browser import CHROMIUM_ARGS, require_chromium

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "case_studies" / "models" / "addition"


@pytest.fixture(scope="module")
def server():
    """`circuitkit serve` in its own process on a free loopback port (pool preimages over 3,000 inputs)."""
    cmd = [sys.executable, "-m", "circuitkit.cli", "serve", str(MODEL), "--port", "0", "--pool", "3000",
           "--threads", "1", "--case", str(REPO / "reports" / "addition")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()  # printed once the model is loaded and the port is bound
    match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    assert match, line + proc.stderr.read() if proc.poll() is not None else line
    yield match.group(1)
    os.killpg(proc.pid, signal.SIGTERM)  # stopped by its own PID
    proc.wait(timeout=30)


def _call(url: str, body: object | None = None, raw: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A request as the explorer's own page sends it (a POST carries the page's Origin) unless ``headers``
    say otherwise."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    parts = urllib.parse.urlsplit(url)
    own = {"Origin": f"{parts.scheme}://{parts.netloc}"} if data is not None else {}
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={**own, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait(url: str, job: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, s = _call(f"{url}api/jobs/{job}")
        assert status == 200
        if s["state"] != "running":
            return s
        time.sleep(0.2)
    raise AssertionError("the preimage job did not finish in 120 s")


def test_the_page_samples_a_preimage_beside_the_attention(server, tmp_path):
    from playwright.sync_api import sync_playwright

    exe = require_chromium()
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "400" not in m.text else None)
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server) else None)
        page.goto(server, wait_until="load")
        page.wait_for_selector(".tok")
        assert "a1.1" in page.inner_text("#site")  # the page names the model's sites
        page.fill("#input", "B615+861=1476E")
        page.click("#analyse")
        page.wait_for_function("document.querySelectorAll('.tok').length === 14")
        page.click(".tok[data-pos='8']")  # '='
        page.select_option("#site", "a1.1")
        page.click("#sample")
        page.wait_for_selector("#results tr.sample", timeout=120_000)
        rows = page.eval_on_selector_all("#results tr.sample", "rs => rs.map(r => [r.innerText, r.dataset.distance])")
        assert rows[0][0].replace("\t", "").replace("\n", "").endswith("B615+861=1476E")  # the query itself ...
        assert float(rows[0][1]) <= 0.1  # ... lies within ε of its own activation
        assert all(float(d1) <= float(d2) for (_, d1), (_, d2) in zip(rows, rows[1:]))  # sorted by distance
        assert page.locator("#attention .head").count() == 8  # 2 layers x 4 heads at the selected position
        assert "within ε" in page.inner_text("#progress")
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        page.fill("#input", "B615+861=1477E")  # a wrong sum
        page.click("#analyse")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert "is not 615+861 = 1476" in page.inner_text("#error")
        browser.close()
    assert outside == [] and errors == [], (outside, errors)


@pytest.mark.parametrize("path,body,status,message", [
    ("api/analyse", {"input": "B615+861=1477E"}, 400, "is not 615+861 = 1476"),
    ("api/analyse", {"input": 5}, 400, "must be a string"),
    ("api/preimage", {"input": "B615+861=1476E", "site": "a9.0", "position": 8}, 400, "layer 9 does not exist"),
    ("api/preimage", {"input": "B615+861=1476E", "site": "a1.1", "position": 14}, 400, "token index 0..13"),
    ("api/preimage", {"input": "B615+861=1476E", "site": "a1.1@=", "position": 8}, 400, "without a position"),
    ("api/preimage", {"input": "B615+861=1476E", "site": "nonsense", "position": 8}, 400, "site"),
    ("api/jobs/ffffffffffff", None, 404, "no job"),
    ("nowhere", None, 404, "no such page"),
])
def test_bad_requests_get_a_4xx_and_a_message(server, path, body, status, message):
    got, data = _call(server + path, body)
    assert got == status and message in data["error"], (got, data)


def test_garbage_bodies_and_a_flood_of_jobs_do_not_break_the_server(server):
    assert _call(server + "api/analyse", raw=b"{not json")[0] == 400
    assert _call(server + "api/analyse", raw=b"[1, 2]")[0] == 400
    results: list[tuple[int, dict]] = []

    def one() -> None:
        results.append(_call(server + "api/preimage", {"input": "B615+861=1476E", "site": "m0", "position": 3,
                                                       "samples": 8}))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [c for c, _ in results]
    assert set(codes) <= {202, 429} and 202 in codes and 429 in codes, codes  # bounded, never a 500
    assert all("already being sampled" in d["error"] for c, d in results if c == 429)
    for c, d in results:
        if c == 202:
            assert _wait(server, d["job"])["state"] == "done"
    status, info = _call(server + "api/info")
    assert status == 200 and info["source"] == "pool"


def test_a_finished_job_exports_the_report_panel(server):
    status, job = _call(server + "api/preimage", {"input": "B615+861=1476E", "site": "a0.0", "position": 8,
                                                  "samples": 16})
    assert status == 202
    done = _wait(server, job["job"])
    assert done["state"] == "done" and done["result"]["samples"][0]["distance"] == 0.0
    with urllib.request.urlopen(f"{server}api/jobs/{job['job']}/panel", timeout=30) as r:
        html = r.read().decode()
        assert "attachment" in r.headers["Content-Disposition"]
    assert html.startswith("<!doctype html>") and "ε = 0.1" in html and "B615+861=1476E" in html


def test_with_a_decoder_the_explorer_samples_and_colours(tmp_path):
    """Decoder mode in process: the requested number of samples over the paper's grid, each re-run through
    the model and coloured, and a site the decoder was not trained on is refused by name."""
    from circuitkit.errors import CircuitkitError
    from circuitkit.explorer.session import Explorer
    from circuitkit.inversion.checkpoint import load_decoder
    from circuitkit.inversion.sample import PAPER_GRID
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.sites import parse_site

    pm = load_probed(MODEL)
    train_decoder(pm, tmp_path / "dec", DecoderTrainConfig(steps=3, d_model=16, cond_mid=32, batch_size=8,
                                                           final_eval_queries=0), sites=[parse_site("a1.1")],
                  progress=False)
    ex = Explorer(pm, load_decoder(tmp_path / "dec", pm))
    assert ex.sites() == ["a1.1"] and ex.info()["source"] == "decoder"
    r = ex.preimage("a1.1", 8, "B615+861=1476E", n_samples=64)
    per_cell = -(-64 // len(PAPER_GRID))
    assert r["n_samples"] == per_cell * len(PAPER_GRID) and len(r["samples"]) <= 100
    assert all(len(s["colours"]) == len(s["tokens"]) for s in r["samples"])
    assert [s["distance"] for s in r["samples"]] == sorted(s["distance"] for s in r["samples"])
    with pytest.raises(CircuitkitError, match="not available here; valid: a1.1"):
        ex.preimage("a0.0", 8, "B615+861=1476E")


def test_the_committed_decoder_finds_its_model_and_samples_within_eps():
    """case_studies/models/addition_decoder names its model relative to itself, and a live query on it
    returns samples inside the ε-preimage (seeded, so the same every run)."""
    from circuitkit.explorer.session import Explorer
    from circuitkit.inversion.checkpoint import load_decoder

    td = load_decoder(REPO / "case_studies" / "models" / "addition_decoder")
    assert td.probed.path.resolve() == MODEL.resolve() and len(td.sites) == 13
    r = Explorer(td.probed, td).preimage("a1.1", 8, "B615+861=1476E", n_samples=256)
    assert r["n_in_eps"] > 0 and r["samples"][0]["in_eps"] and r["samples"][0]["distance"] <= 0.1


def test_a_bare_case_name_finds_its_run_or_report(monkeypatch, tmp_path):
    from circuitkit.errors import CircuitkitError
    from circuitkit.explorer.session import Explorer
    from circuitkit.models.checkpoint import load_probed

    pm = load_probed(MODEL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").symlink_to(REPO / "reports")
    ex = Explorer(pm, None, "addition")
    assert ex.case["name"] == "addition" and ex.case["nodes"] and ex.info()["examples"][0] == ex.info()["example"]
    with pytest.raises(CircuitkitError, match="has no circuit.json"):
        Explorer(pm, None, "no_such_case")


# ---- only its user drives it: Host, Origin and the launch token (access.AccessPolicy) ---------------------------

@pytest.fixture(scope="module")
def explorer_obj():
    from circuitkit.explorer.session import Explorer
    from circuitkit.models.checkpoint import load_probed

    return Explorer(load_probed(MODEL), None, pool_size=500)


@contextlib.contextmanager
def _in_process(explorer, host: str = "127.0.0.1"):
    from circuitkit.explorer.server import ExplorerServer

    srv = ExplorerServer(explorer, host, 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _raw(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, dict]:
    """A request with exactly these headers (Host included), as a forging page or script would send it."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in {**headers, "Content-Length": str(len(body))}.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if r.headers.get("Content-Type") == "application/json" else {}), dict(r.headers)


def test_a_forged_host_or_origin_is_refused_on_loopback(explorer_obj):
    with _in_process(explorer_obj) as srv:
        port = srv.server_address[1]
        own = f"127.0.0.1:{port}"
        assert _raw(port, "GET", "/api/info", {"Host": own})[0] == 200
        assert _raw(port, "GET", "/api/info", {"Host": f"localhost:{port}"})[0] == 200
        status, body, _ = _raw(port, "GET", "/api/info", {"Host": f"evil.example:{port}"})  # DNS rebinding
        assert status == 403 and "is not an address this explorer answers to" in body["error"]
        assert _raw(port, "GET", "/api/info", {})[0] == 403  # no Host at all
        analyse = json.dumps({"input": "B615+861=1476E"}).encode()
        status, body, _ = _raw(port, "POST", "/api/analyse", {"Host": own, "Origin": "http://evil.example"}, analyse)
        assert status == 403 and "may not change anything here" in body["error"]
        status, body, _ = _raw(port, "POST", "/api/preimage", {"Host": own}, analyse)  # no Origin, no token
        assert status == 403
        assert _raw(port, "POST", "/api/analyse", {"Host": own, "Origin": f"http://{own}"}, analyse)[0] == 200
        token = srv.access.token
        assert _raw(port, "POST", "/api/analyse", {"Host": own, "Authorization": f"token {token}"}, analyse)[0] == 200
        assert srv.url == f"http://{own}/?token={token}"


def test_beyond_loopback_every_request_needs_the_launch_token(explorer_obj):
    with _in_process(explorer_obj, host="0.0.0.0") as srv:
        port = srv.server_address[1]
        host = {"Host": f"192.0.2.7:{port}"}  # any name the machine is reached by
        status, body, _ = _raw(port, "GET", "/api/info", host)
        assert status == 403 and "needs its launch token" in body["error"]
        assert _raw(port, "GET", "/api/info?token=wrong", host)[0] == 403
        status, _, headers = _raw(port, "GET", f"/?token={srv.access.token}", host)
        assert status == 200 and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert _raw(port, "GET", "/api/info", {**host, "Cookie": cookie})[0] == 200  # the page's own calls


def test_a_remote_bind_needs_allow_remote(capsys):
    from circuitkit.cli import main

    assert main(["serve", str(MODEL), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "pass --allow-remote" in capsys.readouterr().err


def test_twenty_concurrent_clients_get_answers_or_429_never_a_5xx():
    """The load benchmark's driver for 10 s (`benchmarks/explorer_load.py` runs it for a minute): every request
    is answered, nothing fails inside, every job finishes or is refused with 429, and memory stays bounded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("explorer_load", REPO / "benchmarks" / "explorer_load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    proc, base = load.start_server(MODEL)
    try:
        result = load.drive(base, clients=20, seconds=10)
        peak = load.peak_memory_mb(proc.pid)
    finally:
        load.stop_server(proc)
    assert result["server_errors_5xx"] == 0 and result["connection_errors"] == 0, result
    jobs = result["jobs"]
    assert jobs.get("started", 0) >= 1 and jobs.get("done", 0) + jobs.get("error", 0) == jobs["started"], jobs
    assert "unfinished" not in jobs and jobs.get("refused_429", 0) >= 1  # the bound on work in flight held
    assert set(result["statuses"]) <= {"200", "202", "400", "429"}, result["statuses"]
    assert peak is None or peak < 3000, peak  # MB: bounded (about 0.7 GB measured)
