"""Exact ε-preimages for addition, by brute force over all 810,000 inputs.

Addition is small enough to run the probed model on every input, so the *true* ε-preimage of a
query is known: ``exact_distances`` gives every input's distance to a query at a site, against which
a decoder's samples can be checked (tests/test_inversion.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.inversion.preimage import verify
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site
from circuitkit.tasks.addition import HIGH, LOW

DEFAULT_FEATURES = ("F1", "F2", "F3", "S1", "S2", "S3", "carry(1)", "carry(2)", "carry(3)", "sum", "A1", "A2",
                    "A3", "A4")


def all_addition_inputs(task) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [810000, 14], a [810000], b [810000]) for every a, b in [100, 999], built vectorised."""
    if task.name != "addition":
        raise CircuitkitError(f"exact preimages are only tractable for addition, not {task.name!r}")
    v = task.vocab
    r = torch.arange(LOW, HIGH + 1)
    a = r.repeat_interleave(len(r))
    b = r.repeat(len(r))
    s = a + b
    n = a.shape[0]
    ids = torch.full((n, task.seq_len), v.pad_id, dtype=torch.long)

    def digits(x: Tensor, k: int) -> Tensor:  # k digits, most significant first
        return torch.stack([(x // 10 ** (k - 1 - i)) % 10 for i in range(k)], 1)

    ids[:, 0] = v.bos_id
    ids[:, 1:4] = digits(a, 3)
    ids[:, 4] = v.id_of("+")
    ids[:, 5:8] = digits(b, 3)
    ids[:, 8] = v.id_of("=")
    four = s >= 1000
    ids[four, 9:13] = digits(s[four], 4)
    ids[four, 13] = v.eos_id
    ids[~four, 9:12] = digits(s[~four], 3)
    ids[~four, 12] = v.eos_id
    return ids, a, b


def exact_distances(model: ProbedModel, site: Site, query: Tensor, metric: str = "l2",
                    inputs: Tensor | None = None, batch_size: int = 8192) -> Tensor:
    """Distance [810000] of every addition input to ``query`` at ``site``."""
    ids = inputs if inputs is not None else all_addition_inputs(model.task)[0]
    d, _ = verify(model, site.at(None), ids, query, metric, batch_size=batch_size)
    return d
