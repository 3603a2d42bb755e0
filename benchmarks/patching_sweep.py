"""Benchmark: full head x position patching sweep, circuitkit vs TransformerLens, one process.

Runs ``circuitkit.patching.sweep.sweep(kind="head")`` (incremental: the patched row alone, the last block
from the base's keys and attention sums), the same sweep with ``incremental=False`` (the patched block
re-run over every row) and
``transformer_lens.patching.get_act_patch_attn_head_out_by_pos`` (on the TransformerBridge over
the same weights, same base/corrupted tokens, same source/clean cache, same metric) alternately,
checks they agree (|Δ| <= 1e-4 on every cell) and writes the times and the speed-up to JSON.

    .venv/bin/python benchmarks/patching_sweep.py [--model DIR] [--batch 256] [--threads 2] [--device cuda]

With ``--device cuda`` every timed region ends with ``torch.cuda.synchronize()`` (device work is
asynchronous), and one untimed warm-up round of each method runs first (kernel loading, cuBLAS handles).

Without --model a paper-shaped addition model (2 layers, 4 heads, d_model 32) is trained briefly
into a temp dir: the timing does not depend on how well the model is trained.

``--shape gpt2-small`` times GPT-2 small's shape instead (12 layers, 12 heads, d_model 768, d_mlp 3072, random
weights at GPT-2's initialisation; ``--layers N`` for fewer layers) on the word-level IOI task (21 positions:
12 x 21 x 12 = 3,024 head x position cells), batch 16 by default, one repeat, contrast R:

    .venv/bin/python benchmarks/patching_sweep.py --shape gpt2-small [--layers 12] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import patching as tl_patching

from circuitkit.errors import CircuitkitError
from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch
from circuitkit.manifest import git_commit, package_versions
from circuitkit.models.checkpoint import load_probed
from circuitkit.models.train import TrainConfig, build_model, train_probed, write_trained
from circuitkit.patching.metrics import evaluate
from circuitkit.patching.sweep import sweep
from circuitkit.tasks import get_task
from circuitkit.validate import check_device

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "patching_sweep.json"
#: --shape: (task, TrainConfig fields, description); "paper" trains briefly, the others keep their random weights
SHAPES = {"paper": ("addition", dict(n_layer=2, n_head=4, d_model=32), "paper shape 2L 4H d32"),
          "gpt2-small": ("ioi", dict(n_layer=12, n_head=12, d_model=768), "GPT-2 small shape 12L 12H d768")}


def _sync(device: str) -> None:
    """Wait for queued device work, so that a host clock times it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def shaped_model(path: str | None, device: str, shape: str = "paper", layers: int | None = None):
    """(probed model, its description): the checkpoint at ``path``, else a model of ``SHAPES[shape]`` (also used
    by ``discovery_methods.py --shape``)."""
    if path:
        return load_probed(path, device=device), path
    task_name, dims, desc = SHAPES[shape]
    dims = {**dims, **({"n_layer": layers} if layers else {})}
    tmp = Path(tempfile.mkdtemp(prefix=f"ck_bench_{shape}_")) / "ckpt"
    if shape == "paper":
        cfg = TrainConfig(steps=150, batch_size=64, lr=3e-3, warmup=20, eval_limit=200, checkpoint_every=1000, **dims)
        train_probed(get_task(task_name), tmp, cfg, progress=False)
        return load_probed(tmp, device=device), f"trained briefly (150 steps), {desc}"
    task, cfg = get_task(task_name), TrainConfig(**dims)
    torch.manual_seed(0)
    write_trained(build_model(task, cfg).eval(), task, cfg, tmp, {}, [])  # random weights, GPT-2's init
    kept = "" if dims["n_layer"] == SHAPES[shape][1]["n_layer"] else f", cut to {dims['n_layer']} layers"
    return load_probed(tmp, device=device), f"random weights, {desc}{kept}, task {task_name}"


def _pairs(task, n: int, contrast: str, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    base = task.generate(rng, n)
    if contrast == "F":
        return base, [task.contrast_minimal(t, rng) for t in base]
    return base, [task.contrast_random(t, rng) for t in base]  # R: random other input, same length


def run(model: str | None, batch: int, threads: int, repeats: int, contrasts: list[str], device: str = "cpu",
        shape: str = "paper", layers: int | None = None, full_recompute: bool = True) -> dict:
    torch.set_num_threads(threads)
    load = LoadWatch(threads)
    pm, model_desc = shaped_model(model, device, shape, layers)
    task = pm.task
    bridge = pm.bridge()
    bridge.set_use_attn_result(True)
    results = {}
    for contrast in contrasts:
        base, src = _pairs(task, batch, contrast, seed=0)
        bids, sids = task.encode(base), task.encode(src)
        ours_t, full_t, tl_t, max_diff, max_diff_full = [], [], [], 0.0, 0.0
        warmup = 1 if device.startswith("cuda") else 0
        for rep in range(warmup + repeats):  # alternate, so that machine load hits all three alike
            timed = rep >= warmup
            _sync(device)
            t0 = time.perf_counter()
            ours = sweep(pm, base, "head", source=src, progress=False)
            _sync(device)
            if timed:
                ours_t.append(time.perf_counter() - t0)
            if full_recompute:
                t0 = time.perf_counter()
                full = sweep(pm, base, "head", source=src, progress=False, incremental=False)
                _sync(device)
                if timed:
                    full_t.append(time.perf_counter() - t0)
                max_diff_full = max(max_diff_full, float((full.values - ours.values).abs().max().cpu()))
            ctx = ours.context.to(device)

            def metric(logits: torch.Tensor, ctx=ctx) -> torch.Tensor:
                return evaluate("logit_diff", logits, ctx)[0].mean()

            t0 = time.perf_counter()
            with torch.no_grad():
                _, clean_cache = bridge.run_with_cache(sids.to(device))
                ref = tl_patching.get_act_patch_attn_head_out_by_pos(bridge, bids.to(device), clean_cache, metric)
            _sync(device)
            if timed:
                tl_t.append(time.perf_counter() - t0)
            max_diff = max(max_diff, float((ref.cpu() - ours.mean().cpu()).abs().max()))
        results[contrast] = {
            "batch": batch, "cells": int(ours.mean().numel()),
            "circuitkit_s": {"min": min(ours_t), "median": statistics.median(ours_t), "all": ours_t},
            "circuitkit_full_recompute_s": {"min": min(full_t), "median": statistics.median(full_t), "all": full_t}
            if full_t else None,
            "transformer_lens_s": {"min": min(tl_t), "median": statistics.median(tl_t), "all": tl_t},
            "speedup_min": min(tl_t) / min(ours_t),
            "speedup_median": statistics.median(tl_t) / statistics.median(ours_t),
            "incremental_speedup_min": min(full_t) / min(ours_t) if full_t else None,
            "max_abs_diff": max_diff, "equal_within_1e-4": max_diff <= 1e-4,
            "max_abs_diff_incremental_vs_full": max_diff_full if full_t else None,
        }
    load.stop()
    busy = load.shared
    if busy:  # a loaded machine slows the two sides unequally: no speed-up is stated from such a run
        for r in results.values():
            r["speedup_min"] = r["speedup_median"] = r["incremental_speedup_min"] = None
    return {
        "benchmark": "full head x position activation-patching sweep (get_act_patch_attn_head_out_by_pos)",
        "model": model_desc, "shape": shape,
        "metric": f"logit_diff at the {pm.task.name} task's first answer (answer vs the source's answer)",
        "contrasts": {"R": "random other input of the same length", "F": "the task's minimal edit"},
        "device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
        platform.processor() or platform.machine(),
        "timing": ("host clock around each call, torch.cuda.synchronize() before and after; one untimed warm-up "
                   "round first" if device.startswith("cuda") else "host clock around each call"),
        "threads": threads, "cpu_count": os.cpu_count(),
        **load.record(),
        "machine": platform.platform(), "versions": package_versions(), "git_commit": git_commit(),
        "results": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the --shape's model, built here)")
    ap.add_argument("--shape", default="paper", choices=sorted(SHAPES),
                    help="paper: a briefly trained 2L addition model; gpt2-small: GPT-2 small's shape on ioi")
    ap.add_argument("--layers", type=int, help="with --shape gpt2-small: fewer layers than 12")
    ap.add_argument("--batch", type=int, help="base/source pairs per sweep (default 256; gpt2-small 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, help="default 5; gpt2-small 1")
    ap.add_argument("--contrasts", help="comma-separated: R (random), F (minimal edit); default R,F (gpt2-small R)")
    ap.add_argument("--no-full-recompute", action="store_true", help="skip the incremental=False sweep")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", help="default results/patching_sweep.json (gpt2-small: patching_sweep_gpt2-small.json)")
    a = ap.parse_args()
    big = a.shape == "gpt2-small"
    try:
        device = check_device(a.device)
        if a.layers is not None and not (big and 1 <= a.layers <= 12):
            raise CircuitkitError(f"--layers {a.layers}: only with --shape gpt2-small, from 1 to 12")
    except CircuitkitError as e:
        raise SystemExit(f"error: {e}") from None
    res = run(a.model, a.batch or (16 if big else 256), a.threads, a.repeats or (1 if big else 5),
              (a.contrasts or ("R" if big else "R,F")).split(","), device, a.shape, a.layers, not a.no_full_recompute)
    out = a.out or (RESULTS / f"patching_sweep_{a.shape}{'' if not a.layers else f'_{a.layers}L'}.json" if big else OUT)
    atomic_write_json(out, res)
    for c, r in res["results"].items():
        speed = ("speed-up withheld (loaded machine)" if r["speedup_min"] is None else
                 f"speed-up {r['speedup_min']:.1f}x (median {r['speedup_median']:.1f}x)")
        full = r["circuitkit_full_recompute_s"]
        full_txt = f" (full recompute {full['min']:.3f}s)" if full else ""
        print(f"{c}: circuitkit {r['circuitkit_s']['min']:.3f}s{full_txt}  "
              f"transformer_lens {r['transformer_lens_s']['min']:.3f}s  {speed}  max|Δ| {r['max_abs_diff']:.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
