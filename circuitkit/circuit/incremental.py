"""Incremental ablated runs for ``AblationEvaluator``: recompute only what a new ablation mask can change.

Two savings, both exact up to float rounding (the tests hold them to the full recomputation within 1e-4):

* **Shared prefix.**  Two masks that agree on every layer below L give the same residual stream entering
  block L.  ``ResidualReferences`` keeps, for a few recent runs, the residual stream entering every block
  (``blocks.{L}.hook_resid_pre`` for L >= 1); a new run starts at the deepest block whose input a cached
  run shares.  Circuit growth (C, then C + v), faithfulness curves (prefixes of one order), pruning
  (C − v) and single-node effects (M − v, against the clean run) each differ from a cached run in one
  component, so most of them skip every block below that component's layer.
* **Last block at the targets only.**  The logits are read at the target rows alone, so the last block
  needs keys and values at every row but queries, head outputs, the MLP and the unembedding only at those
  rows (``last_block_at_pairs``).

The cache is bounded in bytes (tensors shared between references counted once): a model whose residual
streams do not fit keeps the second saving only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuitkit.models.runner import ModelRunner


@dataclass
class _Reference:
    heads: Tensor  # bool [layers, n, pos, head]: the run's keep mask
    mlps: Tensor  # bool [layers, n, pos]
    resid: dict[int, Tensor]  # layer L >= 1 -> resid_pre of block L, [n, pos, d_model]


class ResidualReferences:
    """Recent ablated runs' residual streams, keyed by their keep masks (most recent last).

    ``pinned`` references (the clean run) are never evicted; the others are kept while their unique
    bytes fit ``budget_bytes``, oldest evicted first."""

    def __init__(self, n_layers: int, budget_bytes: int, max_recent: int = 4) -> None:
        self.n_layers, self.budget, self.max_recent = n_layers, budget_bytes, max_recent
        self._pinned: list[_Reference] = []
        self._recent: list[_Reference] = []

    @staticmethod
    def _first_difference(ref: _Reference, heads: Tensor, mlps: Tensor) -> int:
        """The lowest layer where the masks differ (``n_layers`` when they are equal)."""
        differs = (ref.heads != heads).flatten(1).any(1) | (ref.mlps != mlps).flatten(1).any(1)  # [layers]
        idx = differs.nonzero()
        return int(idx[0]) if idx.numel() else int(differs.shape[0])

    def best_start(self, heads: Tensor, mlps: Tensor) -> tuple[int, dict[int, Tensor]]:
        """(start layer, resid_pre by layer) for a run with these keep masks: the deepest block, at most
        the last one, whose input a cached run shares (0 and {} when none does)."""
        start, resid = 0, {}
        for ref in self._pinned + self._recent:
            s = min(self._first_difference(ref, heads, mlps), self.n_layers - 1)
            if s > start:
                start, resid = s, ref.resid
        return start, resid

    def fits(self, nbytes: int) -> bool:
        """Whether one run's block inputs (``nbytes``) fit the budget, so remembering runs is worth it."""
        return self.n_layers >= 2 and nbytes <= self.budget

    def _bytes(self) -> int:
        seen: dict[int, int] = {}
        for ref in self._pinned + self._recent:
            for t in ref.resid.values():
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def add(self, heads: Tensor, mlps: Tensor, resid: dict[int, Tensor], pinned: bool = False) -> None:
        """Remember a run (``resid`` must hold every layer 1 .. n_layers-1)."""
        if self.n_layers < 2:
            return  # nothing to skip: every run starts at the only block
        ref = _Reference(heads.clone(), mlps.clone(), resid)
        (self._pinned if pinned else self._recent).append(ref)
        while self._recent and (len(self._recent) > self.max_recent or self._bytes() > self.budget):
            self._recent.pop(0)
        if pinned and self._bytes() > self.budget:
            self._pinned.remove(ref)


def last_block_at_pairs(runner: ModelRunner, x: Tensor, rows: Tensor, t: Tensor, keep_heads: Tensor,
                        keep_mlp: Tensor, src_z: Tensor, src_mlp: Tensor) -> Tensor:
    """Logits [P, vocab] of the last block at the (row, position) pairs ``(rows, t)`` ([P] each).

    x [b, pos, d_model]: the last block's resid_pre; keep_heads [b, pos, head] / keep_mlp [b, pos]: which
    heads / the MLP run live (else they output the source's ``src_z`` [b, pos, head, d_head] / ``src_mlp``
    [b, pos, d_model]), as the evaluator's ``torch.where`` hooks do in a full run."""
    L = runner.n_layers - 1
    pos = torch.arange(x.shape[1], device=x.device)
    h1 = runner.norm1(L, x)
    k, v = runner.keys_values(L, h1, pos)  # [b, pos, head, d_head]
    z = runner.attend_row(runner.query_at(L, h1[rows, t], t), k[rows], v[rows], t)  # [P, head, d_head]
    z = torch.where(keep_heads[rows, t][..., None], z, src_z[rows, t])
    xr = x[rows, t]  # [P, d_model]
    mid = xr + runner.head_out(L, z) + runner.layers[L].b_O
    mlp = runner.mlp(L, runner.norm2(L, runner.mlp_input(L, xr, mid)))
    mlp = torch.where(keep_mlp[rows, t][:, None], mlp, src_mlp[rows, t])
    return runner.unembed(mid + mlp)


__all__ = ["ResidualReferences", "last_block_at_pairs"]
