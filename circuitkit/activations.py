"""Collect activations for many sites and inputs in one batched pass.

The forward pass stops after the last block any requested site needs; positions may be named
(resolved per input through the task) or integer indices.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site, check_site


@torch.no_grad()
def collect_activations(
    model: ProbedModel,
    inputs: Sequence[str] | Tensor,
    sites: Sequence[Site],
    batch_size: int = 1024,
) -> dict[Site, Tensor]:
    """Activations of every site for every input.

    inputs: texts or token ids [n, seq_len].  A site with a position gives [n, d]; without one
    [n, seq_len, d] (pattern sites: d = key positions).  One forward per batch for all sites.
    """
    task = model.task
    ids = inputs if isinstance(inputs, Tensor) else task.encode(list(inputs))
    if ids.ndim != 2:
        raise CircuitkitError(f"token ids must be [batch, pos], got shape {tuple(ids.shape)}")
    for s in sites:
        check_site(s, model.n_layers, model.n_heads)
    hooks = sorted({s.hook_name for s in sites})
    stop = max(s.stop_layer for s in sites)
    stop_at = None if stop >= model.n_layers else stop
    positions = {s: task.position_indices(ids, s.position) for s in sites if s.position is not None}
    chunks: dict[Site, list[Tensor]] = {s: [] for s in sites}
    dev = model.device
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(dev)
        _, cache = model.runner.run(batch, cache=hooks, stop_at_layer=stop_at, return_logits=False)
        for s in sites:
            pos = positions[s][start : start + batch_size] if s in positions else None
            chunks[s].append(s.select(cache[s.hook_name], pos).cpu())
    return {s: torch.cat(v) for s, v in chunks.items()}
