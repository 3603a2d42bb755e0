"""Benchmark: decoder training on one process with 2 threads against 2 forked processes with 1 thread each
(``[decoder] processes``), with each case toml's own decoder recipe (→ results/decoder_processes.json).

On 2 cores a decoder step is many small matrix products, and a second intra-op thread speeds it up little; two
processes that each train half of every batch (DDP over gloo) keep both cores busy.  Each way trains a fresh
decoder from the same seed for ``--steps`` steps (no periodic estimate but the one at the end) and then evaluates
it on ``--eval-queries`` held-out queries per site at ``--eval-per-cell`` × 4 samples, the ways alternating in
one process (the order flipping every repeat, after an untimed run of each), so that load hits them alike.  Training time is the trainer's own
(``train_minutes``); the evaluation's is the rest of the call.  The two ways train on different draws (each rank
draws its own pairs), so this times them; whether a case's findings hold is the full case's question
(``case_study.py``).

    .venv/bin/python benchmarks/decoder_processes.py [--tasks counting addition ioi] [--steps 300] [--repeats 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from circuitkit.inversion.train import train_decoder
from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch, gemm_peak
from circuitkit.manifest import git_commit, package_versions
from circuitkit.models.checkpoint import load_probed
from circuitkit.pipeline.config import load_case
from circuitkit.pipeline.run import decoder_train_config

ROOT = Path(__file__).resolve().parents[1]
#: way -> (processes, intra-op threads per process)
WAYS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}


def time_way(task: str, processes: int, threads: int, steps: int, eval_queries: int, eval_per_cell: int) -> dict:
    """Train and evaluate one decoder with the case's recipe on ``processes`` × ``threads``; its times in seconds."""
    pm = load_probed(ROOT / "case_studies" / "models" / task)  # the committed probed model (ioi: without GPT-2)
    cfg = dataclasses.replace(decoder_train_config(load_case(task)), steps=steps, minutes=None, eval_every=10**9,
                              processes=processes, threads=threads, final_eval_queries=eval_queries,
                              final_eval_per_cell=eval_per_cell)
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="decoder-processes-"))
    try:
        t0 = time.perf_counter()
        m = train_decoder(pm, tmp / "dec", cfg, progress=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    train_s = m["train_minutes"] * 60
    return {"train_s": round(train_s, 2), "rest_s": round(wall - train_s, 2), "wall_s": round(wall, 2),
            "ms_per_step": round(train_s / m["steps"] * 1000, 2),
            "samples_per_s": round(m["steps"] * cfg.batch_size / train_s, 1),
            "min_hit_rate": m["eval"]["min_hit_rate"], "world_size": m["world_size"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", choices=["counting", "addition", "ioi"], default=["counting", "addition", "ioi"])
    ap.add_argument("--steps", type=int, default=300, help="training steps per decoder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=20, help="an untimed run of each way first")
    ap.add_argument("--eval-queries", type=int, default=16, help="held-out queries per site in the evaluation")
    ap.add_argument("--eval-per-cell", type=int, default=64, help="× 4 cells = samples per query")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decoder_processes.json"))
    a = ap.parse_args()
    if a.steps < 1 or a.repeats < 1:
        ap.error("--steps and --repeats must be at least 1")
    peak = gemm_peak(2)
    load = LoadWatch(2)
    results: dict[str, dict] = {}
    for task in a.tasks:
        runs: dict[str, list[dict]] = {w: [] for w in WAYS}
        for way in WAYS:  # untimed: first-call costs (thread pools, allocator, imports) fall on neither way
            time_way(task, *WAYS[way], a.warmup_steps, 1, 1)
        for r in range(a.repeats):
            for way in (list(WAYS) if r % 2 == 0 else list(WAYS)[::-1]):
                got = time_way(task, *WAYS[way], a.steps, a.eval_queries, a.eval_per_cell)
                runs[way].append(got)
                print(f"{task} {way}: {got}", file=sys.stderr, flush=True)
        one, two = (runs[w] for w in WAYS)
        train_ratio = [x["train_s"] / y["train_s"] for x, y in zip(one, two, strict=True)]
        rest_ratio = [x["rest_s"] / y["rest_s"] for x, y in zip(one, two, strict=True)]
        results[task] = {"runs": runs,
                         "train_speedup": {"median": round(statistics.median(train_ratio), 3),
                                           "per_repeat": [round(x, 3) for x in train_ratio]},
                         "evaluation_speedup": {"median": round(statistics.median(rest_ratio), 3),
                                                "per_repeat": [round(x, 3) for x in rest_ratio]}}
    load.stop()
    out = {"benchmark": "decoder training and evaluation, 1 process x 2 threads against 2 forked processes x 1 "
                        "thread ([decoder] processes = 2), alternating in one process",
           "recipe": "each case toml's [decoder] recipe (width, slots, floor, batch 128, length groups); "
                     f"{a.steps} steps, one hit-rate estimate at the end; evaluation {a.eval_queries} queries per "
                     f"site x {4 * a.eval_per_cell} samples",
           "speedup_note": "time of 1 process x 2 threads / time of 2 processes x 1 thread, paired by repeat; "
                           "train = the trainer's training time, evaluation = the rest of the call (the final "
                           "estimate and evaluation, process start)",
           "cpu_count": os.cpu_count(), "machine": platform.platform(), "gemm_peak_gflops": round(peak, 1),
           **load.record("speed-up"), "versions": package_versions(), "git_commit": git_commit(),
           "results": results, "produced_by": " ".join(["benchmarks/decoder_processes.py", *sys.argv[1:]])}
    atomic_write_json(a.out, out)
    for task, r in results.items():
        print(f"{task}: training {r['train_speedup']['median']}x, evaluation {r['evaluation_speedup']['median']}x "
              f"faster on 2 processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
