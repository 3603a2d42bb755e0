"""Benchmark: one decoder training step, eager against ``torch.compile`` and the whole batch against length
groups (→ results/decoder_step.json), and what bounds it: time and FLOPs per part of a step against the
machine's measured matrix-multiply rate (``bound``).

A step as ``train_decoder`` takes it with each case toml's ``[decoder]`` recipe (``case_recipe``: width, slots,
mixed sites, batch; a way may name another width): fresh pairs through the probed model, the decoder's forward
and backward (``backward_by_length``), gradient clipping and AdamW. Every way trains its own decoder in one process, interleaved step by step (the order
rotating), so that load hits them alike; each repeat starts fresh decoders from the same seed, so step i of every
way trains on the same batch, and a saving gets a 95% interval over those paired steps. The first ``--warmup``
steps (the compilation) are timed apart. ``--bound-steps 0`` skips the bound. The ways ``d_model-96`` and
``d_model-64`` time a narrower decoder on the same batches (a smaller recipe costs fewer FLOPs per step; whether
it reaches the same hit rate is ``decoder_training.py``'s question).  Earlier runs took the recipes from a table
here, at width 128 for every task: ``decoder_step.json``, ``decoder_length_groups.json`` and ``decoder_width.json``
(their ``recipe`` fields say so).

    .venv/bin/python benchmarks/decoder_step.py [--steps 200] [--repeats 2] [--threads 2]
    .venv/bin/python benchmarks/decoder_step.py --ways whole-batch length-groups --tasks counting addition ioi \
        --bound-steps 0 --out benchmarks/results/decoder_length_groups.json
    .venv/bin/python benchmarks/decoder_step.py --ways eager d_model-96 --tasks counting addition \
        --bound-d-models 128 96 --out benchmarks/results/decoder_width.json
    .venv/bin/python benchmarks/decoder_step.py --ways eager --tasks counting addition ioi --steps 20 --warmup 5 \
        --repeats 1 --bound-steps 50 --out benchmarks/results/decoder_bound.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from circuitkit.inversion.data import PairSource
from circuitkit.inversion.train import (
    DecoderTrainConfig,
    backward_by_length,
    build_for,
    decoder_loss,
    decoder_sites,
    train_forward,
)
from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch, gemm_peak
from circuitkit.manifest import git_commit, package_versions
from circuitkit.models.checkpoint import load_probed
from circuitkit.pipeline.config import load_case
from circuitkit.pipeline.run import decoder_train_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("counting", "addition", "ioi")


def case_recipe(task: str, seed: int = 0, d_model: int | None = None) -> DecoderTrainConfig:
    """The decoder options of the case toml ``task`` (its full settings), with ``seed`` and, when given, another
    width (the conditioning MLP twice it, as the tomls build it)."""
    cfg = dataclasses.replace(decoder_train_config(load_case(task)), seed=seed)
    return cfg if d_model is None else dataclasses.replace(cfg, d_model=d_model, cond_mid=2 * d_model)


class Way(NamedTuple):
    """How a step runs: compiled or eager, the batch in how many length groups, and the decoder's width (None:
    the case toml's)."""

    compiled: bool
    length_groups: int
    d_model: int | None = None


#: the ways; the first way named is the baseline (``vs_<way>`` in the others)
WAYS = {"eager": Way(False, 2), "compiled": Way(True, 2), "whole-batch": Way(False, 1),
        "length-groups": Way(False, 2), "d_model-96": Way(False, 2, 96), "d_model-64": Way(False, 2, 64)}


def _setup(task: str, seed: int, d_model: int | None = None):
    """What every benchmark step shares: the decoder of the case recipe (at width ``d_model``, None: the case's),
    its optimizer, a draw of fresh training pairs (as the trainer draws them) and the pad id."""
    pm = load_probed(ROOT / "case_studies" / "models" / task)
    cfg = case_recipe(task, seed, d_model)
    sites = decoder_sites(pm)
    dec = build_for(pm, sites, cfg)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    source, site_rng, weights = PairSource(pm, "train", seed=seed + 1), random.Random(seed), [1.0] * len(sites)

    def draw():
        if cfg.mixed_sites:
            return source.mixed(sites, weights, cfg.batch_size)
        i = site_rng.randrange(len(sites))
        return source.batch(sites[i], cfg.batch_size), torch.full((cfg.batch_size,), i)

    return cfg, dec, opt, draw, pm.task.vocab.pad_id


def interleaved_steps(task: str, ways: list[str], steps: int, warmup: int, seed: int = 0
                      ) -> dict[str, tuple[float, list[float]]]:
    """Every way trains its own decoder (the same seed, so the same batches) one step at a time in turn, the
    order rotating each step, so that a change in the machine's speed hits every way alike.
    Returns way -> (seconds of its first ``warmup`` steps, its seconds per step after them)."""
    runs = {}
    for way in ways:
        compiled, groups, d_model = WAYS[way]
        _, dec, opt, draw, pad = _setup(task, seed, d_model)
        runs[way] = (dec, torch.compile(dec) if compiled else dec, opt, draw, pad, compiled, groups)
    first, per = dict.fromkeys(ways, 0.0), {w: [] for w in ways}
    for step in range(warmup + steps):
        k = step % len(ways)
        for way in ways[k:] + ways[:k]:
            dec, model, opt, draw, pad, compiled, groups = runs[way]
            t0 = time.perf_counter()
            pairs, site_idx = draw()
            opt.zero_grad(set_to_none=True)
            backward_by_length(model, pairs.ids, pairs.acts, site_idx, pad, groups, compiled)
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
            opt.step()
            dt = time.perf_counter() - t0
            if step < warmup:
                first[way] += dt
            else:
                per[way].append(dt)
    return {w: (first[w], per[w]) for w in ways}


def paired_saving(base: list[float], other: list[float]) -> dict:
    """The share of the base's time per step that ``other`` saves, with a 95% t-interval over the paired steps
    (step i of both ways trained on the same batch)."""
    from scipy import stats

    diffs = [b - o for b, o in zip(base, other, strict=True)]
    mean_base = statistics.fmean(base)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    m = statistics.fmean(diffs)
    return {"saves": round(m / mean_base, 4), "saves_ci95": [round((m - half) / mean_base, 4),
                                                             round((m + half) / mean_base, 4)]}


def step_bound(task: str, steps: int, seed: int = 0, d_model: int | None = None) -> dict:
    """Where an eager step's time goes (drawing pairs through the probed model, the decoder's forward, its
    backward, clipping + AdamW), the FLOPs of each part (``torch.utils.flop_counter``, counted on one step before
    the timed ones) and the rate each part reaches."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, dec, opt, draw, pad = _setup(task, seed, d_model)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()

    with FlopCounterMode(display=False) as fc:
        pairs, site_idx = draw()
    flops = {"pairs": fc.get_total_flops()}
    with FlopCounterMode(display=False) as fc:
        loss = decoder_loss(train_forward(dec, pairs.ids, pairs.acts, site_idx, False), pairs.ids, pad)
        flops["forward"] = fc.get_total_flops()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        flops["backward"] = fc.get_total_flops() - flops["forward"]
    update()
    flops["optimizer"] = 14 * sum(p.numel() for p in dec.parameters())  # AdamW + clipping, ~14 per parameter
    secs, clock = dict.fromkeys(flops, 0.0), [0.0]

    def lap(part: str) -> None:
        """Charge the time since the last lap to ``part``."""
        now = time.perf_counter()
        secs[part] += now - clock[0]
        clock[0] = now

    for _ in range(steps):
        clock[0] = time.perf_counter()
        pairs, site_idx = draw()
        lap("pairs")
        loss = decoder_loss(train_forward(dec, pairs.ids, pairs.acts, site_idx, False), pairs.ids, pad)
        lap("forward")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lap("backward")
        update()
        lap("optimizer")
    ms = {k: v / steps * 1000 for k, v in secs.items()}
    total_ms, total_flops = sum(ms.values()), sum(flops.values())
    return {"ms_per_step": round(total_ms, 2), "ms_by_part": {k: round(v, 2) for k, v in ms.items()},
            "gflop_by_part": {k: round(v / 1e9, 4) for k, v in flops.items()},
            "gflop_per_step": round(total_flops / 1e9, 4),
            "gflops_by_part": {k: round(flops[k] / 1e9 / (ms[k] / 1000), 2) for k in ms},
            "gflops_achieved": round(total_flops / 1e9 / (total_ms / 1000), 2),
            "samples_per_s": round(cfg.batch_size / (total_ms / 1000), 1), "batch": cfg.batch_size,
            "d_model": cfg.d_model}


#: the best float32 GEMM rate this machine has shown (decoder_step.json, the day issue 33's 900 s was set)
BEST_GEMM_GFLOPS = 191


def per_case(bound: dict, steps: int, peak: float) -> dict:
    """A whole case's decoder training from one step's ``bound``: its TFLOP, its seconds at the measured step time,
    and its floor at the GEMM peak measured now and at the best this machine has shown."""
    tflop = bound["gflop_per_step"] * steps / 1000
    return {"steps": steps, "d_model": bound["d_model"], "tflop_per_training": round(tflop, 1),
            "training_s_at_measured_rate": round(bound["ms_per_step"] * steps / 1000),
            "training_s_at_this_gemm_peak": round(tflop * 1000 / peak),
            "training_s_at_191_gflops": round(tflop * 1000 / BEST_GEMM_GFLOPS)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation happens here)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bound-steps", type=int, default=100,
                    help="eager whole-batch steps timed part by part for the bound (0: no bound)")
    ap.add_argument("--ways", nargs="+", choices=list(WAYS), default=["eager", "compiled"],
                    help="the ways to time; the first is the baseline")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=["counting", "addition"])
    ap.add_argument("--bound-d-models", nargs="+", type=int, default=[0],
                    help="decoder widths to count and time for the bound (0: the case toml's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decoder_step.json"))
    a = ap.parse_args()
    if a.steps < 2 or a.repeats < 1:
        ap.error("--steps must be at least 2 (a saving's interval needs two paired steps) and --repeats at least 1")
    torch.set_num_threads(a.threads)
    load = LoadWatch(a.threads)
    results, base_way = {}, a.ways[0]
    for task in a.tasks:
        per: dict[str, list[float]] = {w: [] for w in a.ways}
        first: dict[str, list[float]] = {w: [] for w in a.ways}
        for _ in range(a.repeats):
            for way, (w, times) in interleaved_steps(task, a.ways, a.steps, a.warmup).items():
                first[way].append(round(w, 2))
                per[way] += times
                print(f"{task} {way}: {statistics.fmean(times) * 1000:.1f} ms/step (first {a.warmup} steps "
                      f"{w:.1f} s)", file=sys.stderr, flush=True)
        results[task] = {way: {"ms_per_step_mean": round(statistics.fmean(v) * 1000, 2),
                               "ms_per_step_median": round(statistics.median(v) * 1000, 2), "steps_timed": len(v),
                               "first_steps_s": first[way],
                               **({} if way == base_way else
                                  {f"vs_{base_way}": paired_saving(per[base_way], v)})}
                         for way, v in per.items()}
    peak = gemm_peak(a.threads)
    bound = {(task if d == 0 else f"{task} d_model {d}"): step_bound(task, a.bound_steps, d_model=d or None)
             for task in a.tasks for d in a.bound_d_models} if a.bound_steps > 0 else None
    for task, b in (bound or {}).items():
        b["share_of_gemm_peak"] = round(b["gflops_achieved"] / peak, 4)
        b["floor_ms_at_gemm_peak"] = round(b["gflop_per_step"] / peak * 1000, 3)
        print(f"{task}: {b['ms_per_step']} ms/step {b['ms_by_part']}, {b['gflop_per_step']} GFLOP/step, "
              f"{b['gflops_achieved']} GFLOP/s = {b['share_of_gemm_peak']:.1%} of the {peak:.0f} GFLOP/s GEMM peak",
              file=sys.stderr, flush=True)
    load.stop()
    recipes = {t: case_recipe(t) for t in a.tasks}
    out = {"benchmark": "one decoder training step (fresh pairs, forward, backward, clipping, AdamW), "
                        f"{' vs '.join(a.ways)}, interleaved step by step in one process",
           "ways": {w: WAYS[w]._asdict() for w in a.ways},
           "recipe": {t: {"d_model": f"the way's ({r.d_model}, the case toml's, unless it names another)",
                          "cond_mid": "2 x d_model",
                          **{k: getattr(r, k) for k in ("batch_size", "n_slots", "mixed_sites", "steps")}}
                      for t, r in recipes.items()},
           "threads": a.threads, "cpu_count": os.cpu_count(), "machine": platform.platform(),
           **load.record("idle-machine figure"), "versions": package_versions(), "git_commit": git_commit(),
           "results": results,
           "gemm_peak_gflops": round(peak, 1),
           "bound": bound,
           "bound_note": "where an eager step's time goes (the whole batch at once) and the FLOPs of each part "
                         "(torch.utils.flop_counter; the optimizer's ~14 FLOPs per parameter estimated), against "
                         "the measured float32 GEMM peak on the same threads",
           "produced_by": " ".join(["benchmarks/decoder_step.py", *sys.argv[1:]])}
    if bound:
        out["per_case"] = {t: per_case(bound[t], r.steps, peak) for t, r in recipes.items() if t in bound}
        out["per_case_note"] = ("a whole case's decoder training: steps x this run's whole-batch eager step (no length "
                                "groups), and the floor if every FLOP ran at the GEMM peak measured here or at the "
                                f"{BEST_GEMM_GFLOPS:g} GFLOP/s of the day the 900-s target was set")
    atomic_write_json(a.out, out)
    for task, r in results.items():
        print(task + ": " + ", ".join(f"{w} {v['ms_per_step_mean']} ms"
                                      + (f" (saves {v[f'vs_{base_way}']['saves']:+.1%})" if w != base_way else "")
                                      for w, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
