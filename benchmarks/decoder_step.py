"""Benchmark: one decoder training step, eager against ``torch.compile`` (→ results/decoder_step.json).

A step as ``train_decoder`` takes it with the case tomls' recipes (d_model 128, 4 slots, batch 128; addition
mixes sites): fresh pairs through the probed model, the decoder's forward and backward, gradient clipping and
AdamW, as the trainer runs it (``train_forward``). Both ways run in one process, alternating repeats, so that
machine load hits both alike; each repeat is a fresh decoder from the same seed, its first ``--warmup`` steps
(the compilation) timed apart.

    .venv/bin/python benchmarks/decoder_step.py [--steps 200] [--repeats 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from circuitkit.inversion.data import PairSource
from circuitkit.inversion.train import DecoderTrainConfig, build_for, decoder_loss, decoder_sites, train_forward
from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch
from circuitkit.manifest import package_versions
from circuitkit.models.checkpoint import load_probed

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"counting": {"mixed_sites": False}, "addition": {"mixed_sites": True}}
WAYS = {"eager": False, "compiled": True}


def timed_steps(task: str, compiled: bool, steps: int, warmup: int, seed: int = 0) -> tuple[float, float]:
    """(seconds of the first ``warmup`` steps, mean seconds per step after them)."""
    pm = load_probed(ROOT / "case_studies" / "models" / task)
    cfg = DecoderTrainConfig(d_model=128, cond_mid=256, batch_size=128, n_slots=4, seed=seed, **RECIPES[task])
    sites = decoder_sites(pm)
    dec = build_for(pm, sites, cfg)
    model = torch.compile(dec) if compiled else dec
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    source, site_rng = PairSource(pm, "train", seed=seed + 1), random.Random(seed)
    weights, pad = [1.0] * len(sites), pm.task.vocab.pad_id
    t0 = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            t1 = time.perf_counter()
        if cfg.mixed_sites:
            pairs, site_idx = source.mixed(sites, weights, cfg.batch_size)
        else:
            i = site_rng.randrange(len(sites))
            pairs, site_idx = source.batch(sites[i], cfg.batch_size), torch.full((cfg.batch_size,), i)
        loss = decoder_loss(train_forward(model, pairs.ids, pairs.acts, site_idx, compiled), pairs.ids, pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
    return t1 - t0, (time.perf_counter() - t1) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation happens here)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decoder_step.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = LoadWatch(a.threads)
    results = {}
    for task in RECIPES:
        per: dict[str, list[float]] = {w: [] for w in WAYS}
        first: dict[str, list[float]] = {w: [] for w in WAYS}
        for _ in range(a.repeats):
            for way, compiled in WAYS.items():
                w, s = timed_steps(task, compiled, a.steps, a.warmup)
                first[way].append(round(w, 2))
                per[way].append(s)
                print(f"{task} {way}: {s * 1000:.1f} ms/step (first {a.warmup} steps {w:.1f} s)", file=sys.stderr,
                      flush=True)
        base = min(per["eager"])
        results[task] = {way: {"ms_per_step_min": round(min(v) * 1000, 2), "ms_per_step_all": [round(x * 1000, 2) for x in v],
                               "first_steps_s": first[way], "saves_vs_eager": round(1 - min(v) / base, 3),
                               "median_saves_vs_eager": round(1 - statistics.median(v) / statistics.median(per["eager"]), 3)}
                         for way, v in per.items()}
    load.stop()
    out = {"benchmark": "one decoder training step (fresh pairs, forward, backward, clipping, AdamW), eager vs "
                        "torch.compile, alternating repeats in one process",
           "recipe": "d_model 128, cond_mid 256, 4 slots, batch 128; addition: mixed sites",
           "threads": a.threads, "cpu_count": os.cpu_count(), "machine": platform.platform(),
           **load.record("idle-machine figure"), "versions": package_versions(), "results": results,
           "produced_by": " ".join(["benchmarks/decoder_step.py", *sys.argv[1:]])}
    atomic_write_json(a.out, out)
    for task, r in results.items():
        print(task + ": " + ", ".join(f"{w} {v['ms_per_step_min']} ms ({v['saves_vs_eager']:+.1%})" for w, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
