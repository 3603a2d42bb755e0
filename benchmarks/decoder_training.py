"""Benchmark: decoder hit rate against training minutes (→ benchmarks/results/decoder_<task>.json).

Target (issue #4): hit rate ≥ 0.90 on every paper site of counting and of addition within 60
minutes of training on 2 CPU cores.  The curve points come from the trainer's periodic estimates
(``--eval-queries`` held-out queries per site, ``--eval-per-cell`` × 4 samples each); the final
point is a separate evaluation (``--final-queries`` queries, ``--final-per-cell`` × 4 samples).
For addition, ``--exact-queries`` > 0 also scores samples against the true (brute-force) preimage.

    .venv/bin/python benchmarks/decoder_training.py --task addition --minutes 60
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="addition", choices=["counting", "addition"])
    p.add_argument("--model", help="probed model dir (default runs/models/<task>)")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-queries", type=int, default=16)
    p.add_argument("--eval-per-cell", type=int, default=4)
    p.add_argument("--final-queries", type=int, default=200)
    p.add_argument("--final-per-cell", type=int, default=16)
    p.add_argument("--exact-queries", type=int, default=1, help="addition: queries per site for the exact check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON path (default benchmarks/results/decoder_<task>.json)")
    p.add_argument("--keep", help="also keep the trained decoder here")
    args = p.parse_args()

    from circuitkit.inversion.evaluate import evaluate_decoder
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
    from circuitkit.models.checkpoint import load_probed

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model or ROOT / "runs" / "models" / args.task)
    pm = load_probed(model_dir)
    dec_dir = Path(args.keep) if args.keep else Path("/tmp") / f"circuitkit_bench_decoder_{args.task}_{int(time.time())}"
    cfg = DecoderTrainConfig(d_model=args.d_model, cond_mid=2 * args.d_model, batch_size=args.batch_size, lr=args.lr,
                             steps=10**7, minutes=args.minutes, eval_every=args.eval_every,
                             eval_queries=args.eval_queries, eval_per_cell=args.eval_per_cell, final_eval_queries=0,
                             threads=args.threads)
    t0 = time.time()
    curve = []

    def on_eval(rec: dict) -> None:
        hr = rec["hit_rate"]
        curve.append({"train_minutes": rec["train_minutes"], "wall_minutes": round((time.time() - t0) / 60, 3),
                      "step": rec["step"], "loss": rec["loss"], "min_hit_rate": min(hr.values()), "hit_rate": hr})
        print(f"[{rec['train_minutes']:6.2f} min, step {rec['step']}] loss {rec['loss']:.3f} "
              f"min hit {min(hr.values()):.2f}", file=sys.stderr, flush=True)

    m = train_decoder(pm, dec_dir, cfg, progress=False, on_eval=on_eval, _keep=(keep := {}))
    dec = keep["decoder"].eval()
    from circuitkit.inversion.checkpoint import load_decoder

    td = load_decoder(dec_dir, probed=pm)
    t1 = time.time()
    final = evaluate_decoder(dec, pm, td.sites, n_queries=args.final_queries, n_per_cell=args.final_per_cell)
    result = {
        "task": args.task, "model": str(model_dir), "machine": f"{platform.machine()}, {args.threads} torch threads "
        "(shared 2-core CPU box)", "minutes_budget": args.minutes, "decoder": {"d_model": args.d_model,
        "batch_size": args.batch_size, "lr": args.lr}, "steps": m["steps"], "train_minutes": m["train_minutes"],
        "curve_note": f"curve points: {args.eval_queries} held-out queries/site × {4 * args.eval_per_cell} samples",
        "curve": curve,
        "final": {"n_queries": args.final_queries, "samples_per_query": 4 * args.final_per_cell,
                  "eval_seconds": round(time.time() - t1, 1), **final},
        "target": "hit rate >= 0.90 on every site within 60 min on 2 CPU cores",
        "target_met": final["min_hit_rate"] >= 0.9 and m["train_minutes"] <= 60,
    }
    if args.task == "addition" and args.exact_queries > 0:
        from circuitkit.inversion.data import held_out_queries
        from circuitkit.inversion.preimage import invert_activation
        from circuitkit.paper.addition_exact import all_addition_inputs, exact_distances, score_against_exact

        ids, _, _ = all_addition_inputs(pm.task)
        rows = []
        for s in td.sites:
            q = held_out_queries(pm, s, args.exact_queries, seed=777)
            for k in range(args.exact_queries):
                inv = invert_activation(td, s, q.acts[k], n_per_cell=256)
                true_d = exact_distances(pm, s, q.acts[k], inputs=ids)
                rows.append(score_against_exact(pm, inv, true_d, ids))
        result["exact"] = rows
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"decoder_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(dec_dir, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("task", "steps", "train_minutes", "target_met")}))
    print("final min hit rate", final["min_hit_rate"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
