"""Benchmark: circuit growth, evaluation and edge path patching, incremental against full recomputation.

On a committed case-study model, one process, alternating repeats (incremental first on even repeats, full
first on odd ones) so that machine load hits both alike:

* evaluator: a fresh ``AblationEvaluator`` (its clean, empty and source runs), ``grow_circuit`` from nothing to
  normalised faithfulness 0.9, the MIB curve and ``evaluate_circuit`` (completeness subsets, minimality) of the
  grown circuit, with ``incremental=True`` (start at the deepest block input a remembered run shares, the last
  block at the target rows only) and ``incremental=False`` (every ablated run a full forward pass);
* edges: ``path_patch_to_site`` for every ordered pair of the grown circuit's nodes that can send (and every
  node into the final residual stream at its position), on ``--pairs`` aligned base/source pairs, starting each
  pass at the block it changes against running every pass from the embeddings.

Both must agree: growth must add the same nodes, and every score and every logit must agree within 1e-4 when
the model runs in float64 (one more pass of both, untimed: there the two differ only by float64 rounding).  In
float32 they differ by float32 rounding of values up to tens of logits (the largest |value| is recorded beside the
difference): the full pass computes a block's attention output as a sum over per-head results where a freezing
hook needs them, the incremental one reuses such a block's output or sums differently shaped products.

A speed-up is not stated when another job shared the cores: when the 1-minute load average before the run
exceeds the thread count, or the one after it exceeds the thread count by more than ``LOAD_SLACK`` (a run of
minutes on N threads itself holds the load average at about N).

    .venv/bin/python benchmarks/circuit_incremental.py --case addition [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from circuitkit.circuit.evaluate import AblationEvaluator, evaluate_circuit
from circuitkit.circuit.graph import can_send, is_containment
from circuitkit.circuit.grow import faithfulness_curve, grow_circuit, named_components
from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch
from circuitkit.manifest import git_commit, package_versions
from circuitkit.models.checkpoint import load_probed
from circuitkit.patching.path import path_patch_to_site
from circuitkit.sites import Site, parse_site

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def evaluator_work(pm, incremental: bool, n: int, seed: int) -> tuple[float, dict]:
    """Seconds for evaluator + growth + curve + evaluation, and what they found (for the equality check)."""
    t0 = time.perf_counter()
    ev = AblationEvaluator(pm, n=n, seed=seed, incremental=incremental)
    growth = grow_circuit(ev, [], named_components(ev), target=0.9)
    curve = faithfulness_curve(ev, growth)
    evaluation = evaluate_circuit(pm, growth.added, evaluator=ev, seed=seed)
    seconds = time.perf_counter() - t0
    scores = [ev._memo[k] for k in sorted(ev._memo, key=str)]
    return seconds, {"added": [str(s) for s in growth.added], "curve": np.array(curve.ys, dtype=float),
                     "faithfulness": evaluation.faithfulness_normalized,
                     "scores": np.concatenate([s.logit_diff for s in scores] + [s.kl for s in scores]),
                     "runs": len(scores)}


def differences(a: dict, b: dict, la: list[torch.Tensor], lb: list[torch.Tensor]) -> dict:
    """Largest |incremental − full| of the scores, the curve and the path logits, with the largest |value|."""
    same_runs = a["runs"] == b["runs"]
    return {"same_growth": a["added"] == b["added"],
            "max_abs_diff_scores": float(np.abs(a["scores"] - b["scores"]).max()) if same_runs else float("inf"),
            "max_abs_score": float(np.abs(b["scores"]).max()),
            "max_abs_diff_curve": float(np.abs(a["curve"] - b["curve"]).max()) if same_runs else float("inf"),
            "max_abs_diff_logits": max((float((x - y).abs().max()) for x, y in zip(la, lb)), default=0.0),
            "max_abs_logit": max((float(y.abs().max()) for y in lb), default=0.0)}


def edge_pairs(pm, nodes: list[Site]) -> list[tuple[Site, Site]]:
    """(sender, receiver) pairs as the circuit graph tests them, plus each node into the final residual stream."""
    par = pm.runner.arch.parallel
    out = [(a, b) for a in nodes for b in nodes if can_send(a, b, par) and not is_containment(a, b, par)]
    out += [(a, Site("resid_post", pm.n_layers - 1, position=a.position)) for a in nodes]
    return out


def edge_work(pm, pairs: list[tuple[Site, Site]], ev: AblationEvaluator,
              incremental: bool) -> tuple[float, list[torch.Tensor]]:
    """Seconds for every path on the evaluator's (base, aligned source) pairs where both ends exist (A4 only
    with a 4-digit sum), and the logits."""
    t0 = time.perf_counter()
    out = []
    for s, r in pairs:
        rows = (ev.positions(s.position) >= 0) & (ev.positions(r.position) >= 0)
        out.append(path_patch_to_site(pm, ev.ids[rows], ev.src_ids[rows], s, r, incremental=incremental))
    return time.perf_counter() - t0, out


def run(case: str, threads: int, repeats: int, n: int, n_pairs: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    load = LoadWatch(threads)
    model_dir = ROOT / "case_studies" / "models" / case
    pm = load_probed(model_dir)
    ev_t: dict[bool, list[float]] = {True: [], False: []}
    edge_t: dict[bool, list[float]] = {True: [], False: []}
    found: dict[bool, dict] = {}
    logits: dict[bool, list[torch.Tensor]] = {}
    pairs: list[tuple[Site, Site]] = []
    pair_ev = None
    with torch.no_grad():
        for r in range(repeats):
            for inc in ((True, False) if r % 2 == 0 else (False, True)):
                s, f = evaluator_work(pm, inc, n, seed)
                ev_t[inc].append(s)
                found[inc] = f
            if pair_ev is None:
                pairs = edge_pairs(pm, [parse_site(a) for a in found[True]["added"]])
                pair_ev = AblationEvaluator(pm, n=n_pairs, seed=seed + 1)  # its aligned (base, source) pairs
            for inc in ((True, False) if r % 2 == 0 else (False, True)):
                s, out = edge_work(pm, pairs, pair_ev, inc)
                edge_t[inc].append(s)
                logits[inc] = out
        load.stop()
        f32 = differences(found[True], found[False], logits[True], logits[False])
        pm.hf_model.double()  # the exactness check: both again in float64 (untimed)
        pair_ev = AblationEvaluator(pm, n=n_pairs, seed=seed + 1)
        found64 = {inc: evaluator_work(pm, inc, n, seed)[1] for inc in (True, False)}
        logits64 = {inc: edge_work(pm, pairs, pair_ev, inc)[1] for inc in (True, False)}
        f64 = differences(found64[True], found64[False], logits64[True], logits64[False])
    busy = load.shared
    fi = found[True]
    exact_ev = f64["same_growth"] and max(f64["max_abs_diff_scores"], f64["max_abs_diff_curve"]) <= 1e-4

    def timing(ts: dict[bool, list[float]]) -> dict:
        out = {"incremental_s": {"min": min(ts[True]), "median": statistics.median(ts[True]), "all": ts[True]},
               "full_recompute_s": {"min": min(ts[False]), "median": statistics.median(ts[False]), "all": ts[False]}}
        out["speedup_min"] = None if busy else min(ts[False]) / min(ts[True])
        out["speedup_median"] = None if busy else statistics.median(ts[False]) / statistics.median(ts[True])
        return out

    return {
        "benchmark": "circuit growth + curve + evaluation (AblationEvaluator) and edge path patching "
                     "(path_patch_to_site), incremental vs full recomputation",
        "case": case, "model": str(model_dir.relative_to(ROOT)), "eval_inputs": n, "edge_pairs": n_pairs,
        "seed": seed, "threads": threads, "cpu_count": os.cpu_count(), "repeats": repeats,
        "evaluator": {**timing(ev_t), "ablated_runs": fi["runs"], "grown_nodes": fi["added"],
                      "faithfulness_normalized": fi["faithfulness"], "equal_within_1e-4": exact_ev},
        "edges": {**timing(edge_t), "paths": len(pairs), "equal_within_1e-4": f64["max_abs_diff_logits"] <= 1e-4},
        "differences_float64": f64, "differences_float32": f32,
        **load.record(),
        "machine": platform.platform(), "versions": package_versions(), "git_commit": git_commit(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--case", default="addition", choices=["addition", "counting"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=1000, help="evaluation inputs (the case studies' eval_inputs)")
    ap.add_argument("--pairs", type=int, default=150, help="base/source pairs per path (the circuit's edge_pairs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON path (default: results/circuit_incremental_<case>.json)")
    a = ap.parse_args()
    res = run(a.case, a.threads, a.repeats, a.inputs, a.pairs, a.seed)
    out = Path(a.out) if a.out else RESULTS / f"circuit_incremental_{a.case}.json"
    atomic_write_json(out, res)
    for part in ("evaluator", "edges"):
        r = res[part]
        print(f"{part}: incremental {r['incremental_s']['min']:.2f} s, full {r['full_recompute_s']['min']:.2f} s, "
              f"speed-up {r['speedup_min']}, equal within 1e-4: {r['equal_within_1e-4']}")
    print(f"wrote {out}")
    return 0 if res["evaluator"]["equal_within_1e-4"] and res["edges"]["equal_within_1e-4"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
