"""How well attribution patching ranks what exact patching finds, on an addition model.

Nodes: every head x position cell, attribution estimate vs the exact batched sweep.  Edges:
every sender (emb, pos, each head) -> receiver (each later head's q/k/v, each MLP input, the
logits) edge, estimate vs exact path patching.  Spearman rank correlation, all cells and only
the cells exact patching can move (|exact| > 1e-6).  Writes results/attribution_rank.json.

    .venv/bin/python benchmarks/attribution_rank.py [--model case_studies/models/addition] [--n 64]

The seconds it records (attribution against the exact sweep) come with the load average before and after
(``circuitkit.machine_load``).
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch
from circuitkit.manifest import git_commit, package_versions
from circuitkit.models.checkpoint import load_probed
from circuitkit.patching.attribution import attribute
from circuitkit.patching.path import path_patch
from circuitkit.patching.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "attribution_rank.json"


def _rho(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    return float(spearmanr(torch.as_tensor(a).flatten().numpy(), torch.as_tensor(b).flatten().numpy()).statistic)


def one(pm, contrast: str, metric: str, target: str, n: int, seed: int) -> dict:
    task = pm.task
    rng = random.Random(seed)
    base = task.generate(rng, n)
    src = [task.contrast_minimal(t, rng) if contrast == "F" else task.contrast_random(t, rng) for t in base]
    kw = {"metric": metric, "target": target}
    t0 = time.perf_counter()
    att = attribute(pm, base, src, **kw)
    t_att = time.perf_counter() - t0
    t0 = time.perf_counter()
    sw = sweep(pm, base, "head", source=src, progress=False, **kw)
    t_sweep = time.perf_counter() - t0
    exact = (sw.values - sw.base).mean(-1)  # [layer, pos, head]
    est = torch.stack([torch.stack([att.nodes[f"a{L}.{h}"].mean(0) for h in range(pm.n_heads)], -1)
                       for L in range(pm.n_layers)])
    live = exact.abs() > 1e-6
    edges = {e.as_pair(): v for e, v in att.edge_means().items() if not str(e.sender).startswith("m")}
    ex = []
    for s, rcv in edges:
        if rcv == "logits" or rcv.endswith(".in"):
            r = path_patch(pm, base, src, s, "logits" if rcv == "logits" else rcv[:-3], **kw)
        else:
            node, inp = rcv.rsplit(".", 1)
            r = path_patch(pm, base, src, s, node, inp, **kw)
        ex.append(float((r.patched - r.clean).mean()))
    est_e = list(edges.values())
    live_e = [i for i, v in enumerate(ex) if abs(v) > 1e-6]
    return {"contrast": contrast, "metric": metric, "target": target, "n": n,
            "nodes": {"cells": int(exact.numel()), "spearman_all": _rho(est, exact),
                      "live_cells": int(live.sum()), "spearman_live": _rho(est[live], exact[live])},
            "edges": {"edges": len(ex), "spearman_all": _rho(est_e, ex), "live_edges": len(live_e),
                      "spearman_live": _rho([est_e[i] for i in live_e], [ex[i] for i in live_e])},
            "seconds": {"attribution": t_att, "exact_head_sweep": t_sweep}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "case_studies" / "models" / "addition"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = LoadWatch(a.threads)
    pm = load_probed(a.model)
    runs = [one(pm, c, m, t, a.n, 0) for c, m, t in
            (("R", "logit_diff", "A3"), ("F", "logit_diff", "A3"), ("R", "logit", "A2"), ("F", "logit", "A2"))]
    shown = Path(a.model).resolve()
    atomic_write_json(a.out, {"model": str(shown.relative_to(ROOT)) if shown.is_relative_to(ROOT) else a.model,
                              "runs": runs, "threads": a.threads, **load.stop().record("timing comparison"),
                              "versions": package_versions(), "git_commit": git_commit()})
    for r in runs:
        print(f"{r['contrast']} {r['metric']}@{r['target']}: nodes rho={r['nodes']['spearman_all']:.3f} "
              f"(live {r['nodes']['spearman_live']:.3f}, {r['nodes']['live_cells']} cells); edges "
              f"rho={r['edges']['spearman_all']:.3f} (live {r['edges']['spearman_live']:.3f}, {r['edges']['live_edges']})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
