"""Which held-out queries a decoder misses, and how large their ε-preimages are.

The addition decoder's minimum hit rate stays at 0.94 (a1.3, 188 of 200 queries at 1,024 samples) whatever
the step budget or learning rate (benchmarks/results/decoder_addition*.json). This script asks whether the
missed queries are simply hard: for each of a site's held-out queries (the evaluation's own: 200 from the
test split, seed 1234) it draws ``--per-cell`` decoder samples per temperature/noise cell, keeps the closest
sample's distance, and counts how many inputs of a random pool of training inputs lie within ε of the query
(its exact ε-preimage in the pool, the query itself not counted unless the pool holds it).

    .venv/bin/python research/decoder_hard_queries/hard_queries.py    # the committed addition decoder
"""
from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch

from circuitkit.inversion.checkpoint import load_decoder
from circuitkit.inversion.data import held_out_queries
from circuitkit.inversion.distance import DEFAULT_EPS
from circuitkit.inversion.evaluate import query_distances
from circuitkit.inversion.preimage import verify
from circuitkit.inversion.sample import PAPER_GRID
from circuitkit.io_utils import atomic_write_json
from circuitkit.manifest import build_manifest
from circuitkit.sites import parse_site

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default=str(HERE.parents[1] / "case_studies" / "models" / "addition_decoder"),
                    help="a trained decoder directory (default: the committed addition decoder)")
    ap.add_argument("--site", default="a1.3")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--per-cell", type=int, default=64, help="decoder samples per cell (4 cells)")
    ap.add_argument("--pool", type=int, default=50000, help="random training inputs for the exact ε-preimage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    td = load_decoder(a.decoder)
    pm, site = td.probed, parse_site(a.site)
    idx, eps = td.site_index(site), DEFAULT_EPS["l2"]
    q = held_out_queries(pm, site, a.queries, seed=1234)
    with torch.no_grad():
        best = query_distances(td.decoder.eval(), pm, site, idx, q.acts, a.per_cell, PAPER_GRID, "l2",
                                torch.Generator().manual_seed(1234), 2048).min(1).values  # [queries]
        pool = random.Random(0).sample(list(pm.task.split("train")), a.pool)
        pool_ids = pm.task.encode(pool)
        rows = []
        for i in range(a.queries):
            dist, _ = verify(pm, site.at(None), pool_ids, q.acts[i], "l2")
            rows.append({"query": pm.task.decode(q.ids[i].tolist()), "position": int(q.positions[i]),
                         "decoder_min_distance": round(float(best[i]), 4), "hit": bool(best[i] <= eps),
                         "pool_within_eps": int((dist <= eps).sum()), "pool_nearest": round(float(dist.min()), 4)})
    hits, misses = [r for r in rows if r["hit"]], [r for r in rows if not r["hit"]]

    def summary(rs: list[dict]) -> dict:
        counts = [r["pool_within_eps"] for r in rs]
        return {"n": len(rs), "pool_within_eps_median": statistics.median(counts) if counts else None,
                "pool_within_eps_max": max(counts) if counts else None,
                "with_none_in_pool": sum(c == 0 for c in counts)}

    root = HERE.parents[1]
    shown = Path(a.decoder).resolve()
    out = {"decoder": str(shown.relative_to(root)) if shown.is_relative_to(root) else a.decoder, "site": a.site, "eps": eps, "samples_per_query": 4 * a.per_cell,
           "pool_size": a.pool, "hits": summary(hits), "misses": summary(misses),
           "rows": sorted(rows, key=lambda r: r["pool_within_eps"]),
           "manifest": build_manifest("research_decoder_hard_queries", 0, {**vars(a), "decoder": None})}
    atomic_write_json(a.out, out)
    print(f"{a.site}: {len(misses)} of {a.queries} queries without a hit in {4 * a.per_cell} samples")
    print("misses:", out["misses"])
    print("hits:  ", out["hits"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
