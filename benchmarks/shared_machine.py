"""`circuitkit run CASE --quick` on an idle machine and beside one busy process (issue 33: threads that fit).

    .venv/bin/python benchmarks/shared_machine.py addition

Three runs, each in a fresh stage cache, one after another in this process's children:

| run | threads | beside |
|---|---|---|
| ``idle`` | chosen by circuitkit (``circuitkit/threads.py``) | nothing |
| ``shared`` | chosen by circuitkit | one busy single-threaded process |
| ``shared_forced`` | ``--threads`` = the CPUs (the old default) | one busy single-threaded process |

Writes results/shared_machine_<case>.json: wall seconds, the threads each stage used (from the run's manifest),
the load averages before each run, and ``shared / idle`` (the target: <= 1.6).  The idle run is valid only when
the machine had nothing else running (its load rule is in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch
from circuitkit.manifest import git_commit
from circuitkit.threads import affinity_cpus

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 1.6


def _run(case: str, threads: int | None) -> dict:
    """One quick run in a fresh cache: wall seconds and the threads its stages used."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "circuitkit.cli", "run", case, "--quick", "--work", f"{tmp}/work", "--out",
               f"{tmp}/report", "--quiet", "--json"] + (["--threads", str(threads)] if threads else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((Path(tmp) / "report" / "manifest.json").read_text())
    used = {k: v["threads"] for k, v in manifest.get("threads_by_stage", {}).items()}
    return {"wall_seconds": round(wall, 1), "threads_by_stage": used,
            "stage_seconds": json.loads(proc.stdout).get("stages")}


def _beside_busy(case: str, threads: int | None) -> dict:
    """A run while one busy single-threaded process holds a CPU."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        return _run(case, threads)
    finally:
        busy.kill()
        busy.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", default="addition")
    ap.add_argument("--out", metavar="JSON", help="default: results/shared_machine_<case>.json")
    args = ap.parse_args()
    cpus = affinity_cpus()
    load = LoadWatch(cpus)
    idle = _run(args.case, None)
    load.stop()
    runs = {"idle": {**idle, **load.record("idle-machine time")}}
    for name, threads in (("shared", None), ("shared_forced", cpus)):
        before = os.getloadavg()
        runs[name] = {**_beside_busy(args.case, threads), "load_average_before": [round(x, 2) for x in before]}
    ratio = runs["shared"]["wall_seconds"] / runs["idle"]["wall_seconds"]
    forced = runs["shared_forced"]["wall_seconds"] / runs["idle"]["wall_seconds"]
    out = {"case": args.case, "quick": True, "cpus": cpus, "runs": runs,
           "shared_over_idle": round(ratio, 3), "shared_forced_over_idle": round(forced, 3),
           "target_ratio": TARGET_RATIO,
           "meets_target": ratio <= TARGET_RATIO if not runs["idle"]["shared_machine"] else None,
           "git_commit": git_commit()}
    dest = Path(args.out) if args.out else HERE / "results" / f"shared_machine_{args.case}.json"
    atomic_write_json(dest, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
