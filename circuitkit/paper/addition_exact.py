"""Exact ε-preimages for addition, by brute force over all 810,000 inputs.

Addition is small enough to run the probed model on every input, so the *true* ε-preimage of a
query is known.  That lets us score decoder samples: precision (share inside ε, as re-run by the
probed model) and recall (share of the distinct true members reached, and, for each named
feature, share of the values the true preimage takes that the reached members cover).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.inversion.preimage import Inversion, verify
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


def _key(ids_row: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(x) for x in ids_row)


def score_against_exact(model: ProbedModel, inv: Inversion, true_dist: Tensor, inputs: Tensor,
                        features: Sequence[str] = DEFAULT_FEATURES) -> dict:
    """Precision and recall of an inversion's samples against the true ε-preimage."""
    true_mask = true_dist <= inv.eps
    true_ids = inputs[true_mask]
    true_set = {_key(r) for r in true_ids.tolist()}
    seq = model.task.seq_len
    samp = inv.ids[:, :seq]
    if samp.shape[1] < seq:
        samp = torch.cat([samp, samp.new_full((samp.shape[0], seq - samp.shape[1]), model.task.vocab.pad_id)], 1)
    reached = {_key(r) for r in samp.tolist()} & true_set
    feats = model.task.features()
    unknown = [f for f in features if f not in feats]
    if unknown:
        raise CircuitkitError(f"unknown features {unknown}; valid: {', '.join(sorted(feats))}")
    tok = model.task.tokenizer
    per_feature = {}
    true_tokens = [tok.id_tokens(r) for r in true_ids.tolist()]
    reached_tokens = [tok.id_tokens(r) for r in reached]
    for f in features:
        tv = {feats[f](t) for t in true_tokens} - {None}
        rv = {feats[f](t) for t in reached_tokens} - {None}
        per_feature[f] = {"true_values": len(tv), "reached": len(rv & tv),
                          "recall": (len(rv & tv) / len(tv)) if tv else None}
    return {
        "site": str(inv.site), "eps": inv.eps, "n_samples": int(samp.shape[0]),
        "precision": float(inv.in_eps.float().mean()),
        "true_preimage_size": len(true_set), "distinct_members_reached": len(reached),
        "member_recall": (len(reached) / len(true_set)) if true_set else None,
        "feature_recall": per_feature,
    }
