"""Benchmark: sampling and verification throughput, samples/s, 1024 samples per query
(the paper's grid: 256 per (temperature, noise) cell) → benchmarks/results/sampling_throughput.json.

    .venv/bin/python benchmarks/sampling_throughput.py --decoder case_studies/models/addition_decoder

Without --decoder, an untrained decoder of the paper's size (d_model 256) for --model is timed
(untrained decoders rarely emit EOS early, so this is the slow end of sampling).  The load average
before and after is recorded (``circuitkit.machine_load``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder")
    p.add_argument("--model", help="probed model (default: the decoder's, else case_studies/models/addition)")
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--per-cell", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampling_throughput.json"))
    args = p.parse_args()

    from circuitkit.inversion.checkpoint import TrainedDecoder, load_decoder
    from circuitkit.inversion.data import held_out_queries
    from circuitkit.inversion.preimage import special_ids, verify
    from circuitkit.inversion.sample import PAPER_GRID, grid_queries, sample
    from circuitkit.inversion.train import DecoderTrainConfig, build_for, decoder_sites
    from circuitkit.io_utils import atomic_write_json
    from circuitkit.machine_load import LoadWatch
    from circuitkit.manifest import git_commit, package_versions
    from circuitkit.models.checkpoint import load_probed

    torch.set_num_threads(args.threads)
    load = LoadWatch(args.threads)
    if args.decoder:
        td = load_decoder(args.decoder, probed=args.model)
    else:
        pm = load_probed(args.model or ROOT / "case_studies" / "models" / "addition")
        sites = decoder_sites(pm)
        td = TrainedDecoder(build_for(pm, sites, DecoderTrainConfig()).eval(), pm, sites)
    pm = td.probed
    rows = []
    for i, site in enumerate(td.sites):
        q = held_out_queries(pm, site, args.queries, seed=5)
        t_s = t_v = 0.0
        n = 0
        for k in range(args.queries):
            gen = torch.Generator().manual_seed(k)
            acts, temps = grid_queries(q.acts[k], args.per_cell, PAPER_GRID, gen)
            t0 = time.perf_counter()
            ids = sample(td.decoder, acts, i, temps, special_ids(pm), gen, batch_size=args.batch_size)
            t1 = time.perf_counter()
            verify(pm, site, ids, q.acts[k])
            t2 = time.perf_counter()
            t_s += t1 - t0
            t_v += t2 - t1
            n += ids.shape[0]
        rows.append({"site": site.node, "samples": n, "sample_per_s": round(n / t_s, 1),
                     "verify_per_s": round(n / t_v, 1), "end_to_end_per_s": round(n / (t_s + t_v), 1)})
        print(rows[-1], file=sys.stderr, flush=True)
    res = {"task": pm.task.name, "decoder": args.decoder or "untrained, paper size (d_model 256)",
           "decoder_d_model": td.decoder.cfg.d_model, "samples_per_query": args.per_cell * len(PAPER_GRID),
           "torch_threads": args.threads, "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores",
           "sites": rows, "mean_end_to_end_per_s": round(sum(r["end_to_end_per_s"] for r in rows) / len(rows), 1),
           **load.stop().record("idle-machine throughput"), "versions": package_versions(), "git_commit": git_commit(),
           "produced_by": " ".join(["benchmarks/sampling_throughput.py", *sys.argv[1:]])}
    atomic_write_json(args.out, res)
    print(json.dumps({k: res[k] for k in ("task", "decoder_d_model", "mean_end_to_end_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
