"""Distributed decoder training with ``torchrun`` (DistributedDataParallel).

Launch (gloo on CPU, nccl on GPU)::

    python -m torch.distributed.run --nproc_per_node 2 -m circuitkit.inversion.distributed \\
        MODEL --out DEC [--steps N] [--device cpu|cuda] [--save-rank-weights DIR]

Every rank draws its own fresh training pairs; all ranks train the same site in a step (a shared
site RNG, hit rates broadcast from rank 0); DDP averages gradients, so replicas stay identical.
Rank 0 evaluates, checkpoints and writes the decoder.  ``--save-rank-weights`` makes every rank
save its final weights (used by the test that checks the replicas agree).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def launch_command(model: str, out: str, nproc: int = 2, extra: list[str] | None = None) -> list[str]:
    """The ``torchrun`` command line that trains a decoder on ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "circuitkit.inversion.distributed", model, "--out", out, *(extra or [])]


def main(argv: list[str] | None = None) -> int:
    from circuitkit.errors import CircuitkitError
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
    from circuitkit.models.checkpoint import load_probed

    p = argparse.ArgumentParser(prog="circuitkit.inversion.distributed")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float)
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--final-eval-queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--length-groups", type=int, default=2,
                   help="train rows of similar length together, each group trimmed to its longest row (1: one group)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--save-rank-weights", help="directory where every rank writes rank<R>.pt")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = args.device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    try:
        pm = load_probed(args.model, device=device)
        cfg = DecoderTrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                                 d_model=args.d_model, cond_mid=2 * args.d_model, eval_every=args.eval_every,
                                 final_eval_queries=args.final_eval_queries, threads=args.threads,
                                 length_groups=args.length_groups)
        holder: dict = {}
        m = train_decoder(pm, args.out, cfg, progress=rank == 0, device=device, _keep=holder)
        if args.save_rank_weights:
            Path(args.save_rank_weights).mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in holder["decoder"].state_dict().items()},
                       Path(args.save_rank_weights) / f"rank{rank}.pt")
        if rank == 0:
            print(f"trained decoder on {dist.get_world_size()} processes -> {args.out}: {m['steps']} steps")
    except CircuitkitError as e:
        print(f"circuitkit: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
