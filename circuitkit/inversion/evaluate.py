"""Decoder quality: per site, the hit rate (share of held-out queries with ≥ 1 sample within ε)
and the in-ε fraction (share of all samples within ε)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from circuitkit.inversion.data import held_out_queries
from circuitkit.inversion.decoder import InversionDecoder
from circuitkit.inversion.distance import DEFAULT_EPS
from circuitkit.inversion.preimage import special_ids, verify
from circuitkit.inversion.sample import PAPER_GRID, grid_queries, sample
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site


@torch.no_grad()
def evaluate_site(decoder: InversionDecoder, probed: ProbedModel, site: Site, site_idx: int, n_queries: int = 200,
                  n_per_cell: int = 16, grid: Sequence[tuple[float, float]] = PAPER_GRID, metric: str = "l2",
                  eps: float | None = None, seed: int = 1234, batch_size: int = 2048) -> dict:
    """Hit rate and in-ε fraction of one site over ``n_queries`` test-split queries."""
    eps = DEFAULT_EPS[metric] if eps is None else eps
    was_training = decoder.training
    decoder.eval()
    q = held_out_queries(probed, site, n_queries, seed=seed)
    dev = next(decoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    per_query = n_per_cell * len(grid)
    acts, temps = [], []
    for i in range(n_queries):
        a, t = grid_queries(q.acts[i].to(dev), n_per_cell, grid, gen)
        acts.append(a)
        temps.append(t)
    acts_all, temps_all = torch.cat(acts), torch.cat(temps)
    ids = sample(decoder, acts_all, site_idx, temps_all, special_ids(probed), gen, batch_size=batch_size).cpu()
    d, _ = verify(probed, site, ids, q.acts.repeat_interleave(per_query, dim=0), metric, batch_size=batch_size)
    D = d.view(n_queries, per_query)
    inside = D <= eps
    decoder.train(was_training)
    return {"site": site.node, "hit_rate": float(inside.any(1).float().mean()),
            "in_eps_fraction": float(inside.float().mean()), "n_queries": n_queries,
            "samples_per_query": per_query, "median_min_distance": float(D.min(1).values.median())}


def evaluate_decoder(decoder: InversionDecoder, probed: ProbedModel, sites: Sequence[Site], **kw) -> dict:
    rows = [evaluate_site(decoder, probed, s, i, **kw) for i, s in enumerate(sites)]
    return {"sites": rows, "min_hit_rate": min(r["hit_rate"] for r in rows),
            "mean_hit_rate": sum(r["hit_rate"] for r in rows) / len(rows)}
