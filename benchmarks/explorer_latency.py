"""Benchmark: latency of one live preimage query in the explorer (``circuitkit serve``), end to end as the
page asks for it: sample N inputs from the decoder over the paper's grid, re-run them through the probed
model, sort, colour the 100 closest → benchmarks/results/explorer_latency.json.

    .venv/bin/python benchmarks/explorer_latency.py --decoder case_studies/models/addition_decoder

Also times the decoder-free path (exact pool preimages), first query (pool activations computed) and later
ones.  The load average before and after is recorded (``circuitkit.machine_load``); when another job shared
the cores the JSON says so and states no idle-machine latency.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "case_studies" / "models" / "addition"))
    p.add_argument("--decoder", required=True)
    p.add_argument("--site", default="a1.1")
    p.add_argument("--position", type=int, default=8)
    p.add_argument("--input", default="B615+861=1476E")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explorer_latency.json"))
    args = p.parse_args()

    from circuitkit.explorer.session import Explorer
    from circuitkit.inversion.checkpoint import load_decoder
    from circuitkit.io_utils import atomic_write_json
    from circuitkit.machine_load import LoadWatch
    from circuitkit.manifest import package_versions
    from circuitkit.models.checkpoint import load_probed

    torch.set_num_threads(args.threads)
    load = LoadWatch(args.threads)
    pm = load_probed(args.model)
    with_decoder = Explorer(pm, load_decoder(args.decoder, pm))
    pool = Explorer(pm, None)

    def timed(ex: Explorer) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = ex.preimage(args.site, args.position, args.input, args.samples)
        return time.perf_counter() - t0, r

    timed(with_decoder)  # warm-up: first-call allocations
    decoder_s, pool_s = [], []
    pool_first, _ = timed(pool)  # includes generating the pool and its activations for the site
    for _ in range(args.repeats):  # alternating, so a change in load hits both alike
        s, r = timed(with_decoder)
        decoder_s.append(s)
        s, _ = timed(pool)
        pool_s.append(s)
    load.stop()
    out = {
        "what": f"one live preimage query: {args.site} at position {args.position} of {args.input!r}, "
                f"{args.samples} decoder samples (paper grid), re-run, sorted, 100 closest coloured",
        "model": args.model, "decoder": args.decoder, "samples": r["n_samples"], "in_eps": r["n_in_eps"],
        "decoder_seconds": {"median": round(statistics.median(decoder_s), 3), "all": [round(x, 3) for x in decoder_s]},
        "pool_seconds": {"first_query": round(pool_first, 3), "median_later": round(statistics.median(pool_s), 3),
                         "pool_size": pool.pool_size},
        "threads": args.threads, "cpu_count": os.cpu_count(), **load.record("idle-machine latency"),
        "versions": package_versions(),
    }
    atomic_write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("decoder_seconds", "pool_seconds", "shared_machine")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
