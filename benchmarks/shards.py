"""The sharded verbs on one process and on two torchrun ranks (issue 33: past one machine).

    .venv/bin/python benchmarks/shards.py [--model case_studies/models/addition]

For each verb (``patch --sweep head``, ``verify`` of the paper's claims, ``circuit`` on that verification), three
runs one after another:

| run | processes | threads each |
|---|---|---|
| ``one_1thread`` | 1 | 1 |
| ``one_2threads`` | 1 | 2 (what one process gets on this 2-core machine) |
| ``two_ranks`` | 2 (``torchrun -m circuitkit --``, gloo) | 1 |

Writes results/shards_<model>.json: wall seconds (process start to exit, imports and the process group
included), whether the two-rank artifacts equal the one-thread run's byte for byte (the same thread count per
process), the load averages, and the speed-ups.  Valid only on an otherwise idle machine (its load rule is in
the JSON).
"""
from __future__ import annotations

import argparse
import filecmp
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
from circuitkit.shards import launch_command
from circuitkit.threads import affinity_cpus

HERE = Path(__file__).resolve().parent
CLAIMS = ["--claim", "a0.0@=", "F1", "--claim", "a0.1@=", "F1", "--claim", "a0.2@=", "S1", "--claim", "a1.0@=",
          "F1+S1", "--claim", "a1.1@=", "F1", "--claim", "a1.2@=", "S1", "--claim", "m1@=", "F1+S1"]


def _timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return round(wall, 2)


def _same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return bool(files) and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def _verb(name: str, argv: list[str], out_name: str, tmp: Path) -> dict:
    """The three runs of one verb; ``argv`` ends just before its output path."""
    walls, dirs = {}, {}
    for run, threads, nproc in (("one_1thread", 1, 1), ("one_2threads", 2, 1), ("two_ranks", 1, 2)):
        d = tmp / name / run
        d.mkdir(parents=True)
        full = [*argv, str(d / out_name)] + (["--threads", str(threads)] if name != "patch" else [])
        cmd = launch_command(full, nproc) if nproc > 1 else [sys.executable, "-m", "circuitkit", *full]
        walls[run], dirs[run] = _timed(cmd, threads), d
    return {"wall_seconds": walls, "identical_to_one_process": _same(dirs["one_1thread"], dirs["two_ranks"]),
            "speedup_two_ranks_over_1thread": round(walls["one_1thread"] / walls["two_ranks"], 3),
            "speedup_two_ranks_over_2threads": round(walls["one_2threads"] / walls["two_ranks"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="case_studies/models/addition")
    ap.add_argument("--out", metavar="JSON", help="default: results/shards_<model>.json")
    args = ap.parse_args()
    cpus = affinity_cpus()
    load = LoadWatch(cpus)
    verbs = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        verify = ["verify", args.model, *CLAIMS, "--inputs", "3000", "--pairs", "200", "--out"]
        verbs["patch"] = _verb("patch", ["patch", args.model, "--sweep", "head", "--n", "512", "--quiet", "--out"],
                               "sweep.json", tmp)
        verbs["verify"] = _verb("verify", verify, "v.json", tmp)
        verified = tmp / "verify" / "one_1thread" / "v.json"
        verbs["circuit"] = _verb("circuit", ["circuit", args.model, "--verified", str(verified), "--inputs", "1000",
                                             "--eval-inputs", "1000", "--no-picture", "--out"], "c", tmp)
    load.stop()
    out = {"model": args.model, "cpus": cpus, "verbs": verbs,
           "commands": {"two_ranks": " ".join(launch_command(["VERB", "..."], 2))},
           **load.record("one process against two ranks"), "git_commit": git_commit()}
    dest = Path(args.out) if args.out else HERE / "results" / f"shards_{Path(args.model).name}.json"
    atomic_write_json(dest, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
