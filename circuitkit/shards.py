"""Work shared over torch.distributed ranks: each rank runs its share of independent units and every rank ends
with all the results, bit-identical to one process.

A unit is one batch of the work a single process would run (a sweep chunk, an evaluation batch, one
interchange test), taken round robin (unit k runs on rank k mod world size).  Each unit is computed exactly as
one process computes it, with the same shapes, so the results do not depend on the number of ranks (with the
same intra-op thread count; ``torchrun`` sets one thread per rank).

| helper | what |
|---|---|
| ``world()`` | (rank, world size); (0, 1) outside a process group |
| ``is_mine(k)`` | whether unit ``k`` runs on this rank |
| ``sum_disjoint(t)`` | every rank's writes into ``t`` (zeros elsewhere) summed: exact, as each entry has one writer |
| ``gather(done)`` | the union of every rank's ``{unit: result}`` |
| ``map_units(fn, items)`` | ``[fn(x) for x in items]``, each call on one rank, every result on all |
| ``session(command, args)`` | under ``torchrun``: the process group for one CLI command; followers write nowhere |

Launch (gloo on CPU, nccl on GPU; ``patch``, ``hypothesize``, ``verify`` and ``circuit`` shard their work)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m circuitkit -- patch MODEL --sweep head --out S.json

(the ``--`` keeps torchrun from reading circuitkit's options, such as ``--n``, as abbreviations of its own).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from circuitkit.errors import CircuitkitError

T = TypeVar("T")
R = TypeVar("R")

#: the commands whose work is sharded over ranks (the others would only repeat one process's work)
SHARDED_COMMANDS = ("patch", "hypothesize", "verify", "circuit")


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_mine(unit: int) -> bool:
    """Whether unit number ``unit`` runs on this rank (round robin)."""
    rank, size = world()
    return unit % size == rank


def sum_disjoint(t: Tensor) -> Tensor:
    """The sum over ranks of ``t``, where each entry is written by at most one rank and is zero on the others:
    x + 0 = x, so the result equals what the writing rank computed, bit for bit.  Returns ``t`` outside a group."""
    if world()[1] == 1:
        return t
    x = t.detach().cpu().clone() if dist.get_backend() == "gloo" else t.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def gather(done: dict[int, Any]) -> dict[int, Any]:
    """Every rank's ``{unit: result}`` merged (objects travel between this job's own ranks only)."""
    if world()[1] == 1:
        return done
    parts: list[dict[int, Any] | None] = [None] * world()[1]
    dist.all_gather_object(parts, done)
    return {k: v for p in parts for k, v in (p or {}).items()}


def map_units(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, each call on one rank (round robin) and every result on every rank."""
    got = gather({k: fn(x) for k, x in enumerate(items) if is_mine(k)})
    return [got[k] for k in range(len(items))]


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(command: str, args: Any) -> Iterator[bool]:
    """Run one CLI command across ``torchrun``'s ranks; yields whether this rank reports (rank 0).

    Joins the process group (nccl when ``args.device`` names CUDA, one GPU per local rank; gloo otherwise).  A
    follower's ``--out`` points into a temporary folder that is removed afterwards, so only rank 0 writes the
    artifacts and prints its result; every rank computes the same result (each rank's progress bars count its own
    share of the units).  Outside ``torchrun`` this does nothing."""
    if not launched_by_torchrun():
        yield True
        return
    if command not in SHARDED_COMMANDS:
        raise CircuitkitError(f"'circuitkit {command}' does not run across processes; under torchrun run one of: "
                              f"{', '.join(SHARDED_COMMANDS)} (decoders train on several processes with "
                              "'python -m torch.distributed.run ... -m circuitkit.inversion.distributed')")
    device = str(getattr(args, "device", "cpu") or "cpu")
    backend = "gloo"
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device, backend = f"cuda:{local}", "nccl"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    scratch = None
    if rank != 0 and getattr(args, "out", None):
        scratch = tempfile.mkdtemp(prefix=f"circuitkit-rank{rank}-")
        args.out = str(Path(scratch) / Path(args.out).name)
    try:
        yield rank == 0
    finally:
        dist.destroy_process_group()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def launch_command(argv: list[str], nproc: int = 2) -> list[str]:
    """The command line that runs ``circuitkit ARGV`` on ``nproc`` processes of this machine (module doc)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "circuitkit", "--", *argv]


__all__ = ["SHARDED_COMMANDS", "gather", "is_mine", "launch_command", "launched_by_torchrun", "map_units", "session",
           "sum_disjoint", "world"]
