"""Time and peak memory of `circuitkit run CASE` (a fresh stage cache each time).

    .venv/bin/python benchmarks/case_study.py counting --quick
    .venv/bin/python benchmarks/case_study.py addition --report reports/addition   # full settings (long)
    python benchmarks/case_study.py counting --quick --device cuda --out DIR/case_study_counting-quick-cuda.json

Writes results/case_study_<case>[-quick].json: wall seconds, peak resident memory of the run
(GiB, from the child's rusage), per-stage seconds, and the targets (quick <= 5 min, full <= 900 s as issue 33
asks (30 min before), peak memory < 4 GiB for counting and addition).  The targets are for 2 CPU cores: a run
with ``--device cuda`` records its figures and judges none of them.  The machine's float32 GEMM rate, measured
just before the run (``gemm_peak_gflops``), says how fast the machine was: the same 2-core machine has run at
from 94 to 191 GFLOP/s on different days, and a time compares only with times taken at a similar rate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch, gemm_peak
from circuitkit.manifest import git_commit

HERE = Path(__file__).resolve().parent


def findings(results: dict) -> dict:
    """What the run found, beside its timing (so a README can quote both from one JSON): the paper's claims,
    normalised faithfulness (logit difference) per answer with its bootstrap CI, and the circuit's summary."""
    circuit = results.get("circuit", {})
    ev, summary = circuit.get("evaluation", {}), dict(circuit.get("summary", {}))
    summary.pop("timings_s", None)
    return {"claims": results.get("claims", {}),
            "faithfulness_normalized": ev.get("faithfulness_normalized"),
            "faithfulness_normalized_ci": ev.get("faithfulness_normalized_ci"),
            "circuit_summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", metavar="DIR", help="stage cache (default: a temporary directory); must not hold a "
                    "previous run's stages, or the timing is not end to end")
    ap.add_argument("--report", metavar="DIR", help="keep the report here (default: a temporary directory)")
    ap.add_argument("--decoder", metavar="DIR", help="reuse this trained decoder (its training time is then not in "
                    "the wall time; the JSON says so)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (passed to `circuitkit run`)")
    ap.add_argument("--out", metavar="JSON", help="default: results/case_study_<case>[-quick][-cuda].json")
    args = ap.parse_args()
    on_cpu = args.device == "cpu"
    suffix = ("-quick" if args.quick else "") + ("" if on_cpu else "-cuda")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        ap.error(f"--work {args.work} is not empty: a cached stage would make the timing meaningless")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "circuitkit.cli", "run", args.case, "--work", args.work or f"{tmp}/work", "--out",
               args.report or f"{tmp}/report", "--threads", str(args.threads), "--device", args.device, "--quiet",
               "--json"]
        cmd += (["--quick"] if args.quick else []) + (["--decoder", args.decoder] if args.decoder else [])
        peak = gemm_peak(args.threads) if on_cpu else None
        load = LoadWatch(args.threads)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        load.stop()
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # Linux: KiB
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    res = json.loads(proc.stdout)
    limit_s = 300 if args.quick else 900
    out = {"case": args.case, "quick": args.quick, "wall_seconds": round(wall, 1), "peak_rss_gib": round(peak_gib, 3),
           "stage_seconds": res.get("stages"), "threads": args.threads, "cpu_count": os.cpu_count(),
           "device": args.device, "target_seconds": limit_s,
           "gemm_peak_gflops": round(peak, 1) if peak else None,
           # the targets are for 2 idle CPU cores: none is judged on a GPU or a shared machine
           "meets_time_target": wall <= limit_s if on_cpu and not load.shared else None,
           "meets_memory_target": peak_gib < 4.0 if on_cpu else None,
           # 1/5/15-minute load averages: a run's own threads raise them to about --threads; more means the
           # machine was shared and the wall time is not an idle-machine figure
           **load.record("idle-machine time"),
           "git_commit": git_commit()}
    out["findings"] = findings(res.get("results", {}))
    if args.decoder:
        out["decoder_reused"] = args.decoder
        out["meets_time_target"] = None  # not end to end: the decoder was trained elsewhere
    dest = Path(args.out) if args.out else HERE / "results" / f"case_study_{args.case}{suffix}.json"
    atomic_write_json(dest, out)  # a temp file, then renamed: never half-written
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
