"""Decoder training on several processes (DistributedDataParallel): ``torchrun``, or forked CPU ranks.

Launch with ``torchrun`` (gloo on CPU, nccl on GPU; ``--batch-size`` is per process)::

    python -m torch.distributed.run --nproc_per_node 2 -m circuitkit.inversion.distributed \\
        MODEL --out DEC [--steps N] [--device cpu|cuda] [--save-rank-weights DIR]

or set ``processes`` in the trainer's options (``[decoder] processes`` in a case file): ``train_on_processes``
forks that many CPU ranks on this machine, one intra-op thread each, and splits every batch among them.

Every rank draws its own fresh training pairs; all ranks train the same site in a step (a shared
site RNG, and hit-rate estimates every rank shares, each site evaluated on one rank); DDP averages
gradients, so replicas stay identical.  Rank 0 checkpoints and writes the decoder.
``--save-rank-weights`` makes every rank save its final weights (used by the test that checks the replicas
agree).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from circuitkit.errors import CircuitkitError

if TYPE_CHECKING:
    from circuitkit.inversion.train import DecoderTrainConfig
    from circuitkit.models.checkpoint import ProbedModel
    from circuitkit.sites import Site


def launch_command(model: str, out: str, nproc: int = 2, extra: list[str] | None = None) -> list[str]:
    """The ``torchrun`` command line that trains a decoder on ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "circuitkit.inversion.distributed", model, "--out", out, *(extra or [])]


def train_on_processes(probed: ProbedModel, out: Path, cfg: DecoderTrainConfig, sites: Sequence[Site] | None,
                       progress: bool, device: str, partial: str | Path | None) -> dict:
    """``train_decoder``'s result, trained by ``cfg.processes`` forked CPU ranks (gloo; one thread each unless
    ``cfg.threads`` says otherwise).

    Forked, not spawned: the ranks inherit the probed model and its task, which a plug-in task's classes could not
    cross by pickling; like DataLoader workers they then run their own thread count, the way OpenMP stays usable
    after a fork.  Rank 0 writes ``out`` and its progress bar; this process reads the metrics and history back.
    A rank's error comes back as this process's ``CircuitkitError``; a Ctrl-C leaves rank 0's checkpoint, so the
    same call resumes."""
    if not str(device).startswith("cpu"):
        raise CircuitkitError(f"processes = {cfg.processes} forks CPU ranks, but the device is {device!r}; on GPUs "
                              f"launch torchrun (python -m torch.distributed.run ... -m circuitkit.inversion.distributed)"
                              f" or set processes = 1")
    with tempfile.TemporaryDirectory(prefix="circuitkit-ranks-") as tmp:
        errors = Path(tmp)
        ranks = mp.start_processes(_rank_main, nprocs=cfg.processes, join=False, start_method="fork",
                                   args=(cfg.processes, str(errors / "store"), errors, probed, out, cfg, sites,
                                         progress, partial))
        try:
            while not ranks.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            said = sorted(errors.glob("rank*.error"))
            if said:
                raise CircuitkitError(said[0].read_text()) from None
            raise CircuitkitError(f"decoder training on {cfg.processes} processes failed: {e}") from None
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"history": json.loads((out / "train_history.json").read_text()), **metrics}


def _rank_main(rank: int, world: int, store: str, errors: Path, probed: ProbedModel, out: Path,
               cfg: DecoderTrainConfig, sites: Sequence[Site] | None, progress: bool, partial: str | Path | None) -> None:
    """One forked rank of ``train_on_processes``: join the group, train, say any ``CircuitkitError`` in a file."""
    from circuitkit.inversion.train import train_decoder

    torch.set_num_threads(cfg.threads or 1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        train_decoder(probed, out, cfg, sites=sites, progress=progress and rank == 0, device="cpu", partial=partial)
    except CircuitkitError as e:
        (errors / f"rank{rank}.error").write_text(str(e))
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
    from circuitkit.models.checkpoint import load_probed

    p = argparse.ArgumentParser(prog="circuitkit.inversion.distributed")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float)
    p.add_argument("--batch-size", type=int, default=256, help="per process (a step: this × processes rows)")
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
        cfg = DecoderTrainConfig(steps=args.steps, minutes=args.minutes,
                                 batch_size=args.batch_size * dist.get_world_size(),  # the trainer's is per step
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
