"""The explorer under load: concurrent clients analysing inputs and sampling preimages against one
``circuitkit serve`` process for a while → benchmarks/results/explorer_load.json (status counts, 5xx, jobs
finished / refused with 429, latencies, and the server's peak memory).

    .venv/bin/python benchmarks/explorer_load.py              # 20 clients for 60 s on the committed addition model

Traffic goes to the server on loopback only.  The server's peak resident memory is its VmHWM (Linux); the
load average before and after is recorded (``circuitkit.machine_load``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ["B615+861=1476E", "B123+456=579E", "B999+999=1998E", "B100+900=1000E", "B615+861=1477E"]


def start_server(model: Path, pool: int = 3000) -> tuple[subprocess.Popen, str]:
    """``circuitkit serve`` in its own process group on a free loopback port; (process, base URL)."""
    cmd = [sys.executable, "-m", "circuitkit.cli", "serve", str(model), "--port", "0", "--pool", str(pool),
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def peak_memory_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) in MB, where /proc has it."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return None if m is None else int(m.group(1)) / 1024


def _call(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Origin": base} if data is not None else {})  # as the page sends it
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (ConnectionError, urllib.error.URLError, TimeoutError):  # refused, reset or timed out: no answer
        return 0, {}


def drive(base: str, clients: int, seconds: float, seed: int = 0) -> dict:
    """``clients`` threads, each looping analyse → preimage → poll its job, until ``seconds`` pass; every job a
    client starts is followed to its end.  Returns counts and latencies."""
    statuses: Counter = Counter()
    jobs: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.monotonic() < stop:
            text = rng.choice(INPUTS)
            t0 = time.perf_counter()
            status, _ = _call(base, "POST", "/api/analyse", {"input": text})
            with lock:
                statuses[status] += 1
                latencies.append(time.perf_counter() - t0)
            status, body = _call(base, "POST", "/api/preimage", {"input": text, "site": rng.choice(["a1.1", "a0.0"]),
                                                                 "position": 8, "samples": 64})
            with lock:
                statuses[status] += 1
            if status == 429:
                with lock:
                    jobs["refused_429"] += 1
                time.sleep(0.05)
                continue
            if status != 202:
                continue
            with lock:
                jobs["started"] += 1
            deadline = time.monotonic() + 120
            while True:
                status, state = _call(base, "GET", f"/api/jobs/{body['job']}")
                with lock:
                    statuses[status] += 1
                if status != 200 or state.get("state") != "running":
                    with lock:
                        jobs[state.get("state", f"http_{status}")] += 1
                    break
                if time.monotonic() > deadline:
                    with lock:
                        jobs["unfinished"] += 1
                    break
                time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "connection_errors": statuses.get(0, 0),
            "jobs": dict(jobs), "requests": sum(statuses.values()),
            "analyse_latency_s": {"median": round(statistics.median(latencies), 4),
                                  "p95": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 4)}
            if latencies else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "case_studies" / "models" / "addition"))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explorer_load.json"))
    args = p.parse_args()

    from circuitkit.io_utils import atomic_write_json
    from circuitkit.machine_load import LoadWatch
    from circuitkit.manifest import git_commit, package_versions

    proc, base = start_server(Path(args.model))
    try:
        idle_mb = peak_memory_mb(proc.pid)
        watch = LoadWatch(threads=2)
        t0 = time.perf_counter()
        result = drive(base, args.clients, args.seconds)
        wall = time.perf_counter() - t0
        watch.stop()
        peak = peak_memory_mb(proc.pid)
    finally:
        stop_server(proc)
    record = {"what": f"{args.clients} clients analysing and sampling preimages against one explorer",
              "model": str(Path(args.model).relative_to(ROOT)) if Path(args.model).is_relative_to(ROOT) else args.model,
              "clients": args.clients, "seconds": args.seconds, "wall_s": round(wall, 1), **result,
              "server_peak_rss_mb_after_start": None if idle_mb is None else round(idle_mb, 1),
              "server_peak_rss_mb": None if peak is None else round(peak, 1),
              "versions": package_versions(), "git_commit": git_commit(), **watch.record("latency")}
    atomic_write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("requests", "statuses", "server_errors_5xx", "connection_errors", "jobs",
                                             "server_peak_rss_mb_after_start", "server_peak_rss_mb")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
