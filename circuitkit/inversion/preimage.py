"""ε-preimages: sample from the decoder, re-run every sample through the probed model, keep the close ones.

The decoder proposes, the probed model decides: a sample's distance to the query is always
computed from the probed model's own activations of that sample (``distance.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.inversion.checkpoint import TrainedDecoder
from circuitkit.inversion.data import site_activations
from circuitkit.inversion.distance import DEFAULT_EPS, check_metric, sample_distances
from circuitkit.inversion.sample import PAPER_GRID, SpecialIds, grid_queries, sample
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.results import JsonResult
from circuitkit.sites import Site, check_site, parse_site

#: upper bound on samples per (temperature, noise) cell: 64x the paper's 256, far past any useful value
MAX_PER_CELL = 16384


def special_ids(model: ProbedModel) -> SpecialIds:
    v = model.task.vocab
    return SpecialIds(v.bos_id, v.eos_id, v.pad_id)


@torch.no_grad()
def query_activation(model: ProbedModel, site: Site | str, text: str) -> Tensor:
    """The activation [d] of ``site`` (with a position) on input ``text``."""
    s = parse_site(site) if isinstance(site, str) else site
    if s.position is None:
        raise CircuitkitError(f"site {s} needs a position to invert, e.g. {s.node}@{model.task.position_names[-1]} "
                              f"or {s.node}@3; named positions: {', '.join(model.task.position_names)}")
    check_site(s, model.n_layers, model.n_heads)
    ids = model.task.encode([text]).to(model.device)
    pos = model.task.position_indices(ids.cpu(), s.position)
    return site_activations(model, s, ids)[0, int(pos[0])]


@torch.no_grad()
def verify(model: ProbedModel, site: Site, ids: Tensor, query: Tensor, metric: str = "l2",
           batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Re-run samples ids [n, pos] through the probed model: (distance [n], closest position [n]).

    query: [d] (one query for all samples) or [n, d] (one per sample).
    """
    check_metric(metric)
    seq = model.task.seq_len
    if ids.shape[1] < seq:
        ids = torch.cat([ids, ids.new_full((ids.shape[0], seq - ids.shape[1]), model.task.vocab.pad_id)], 1)
    ids = ids[:, :seq]
    dists, where = [], []
    for s in range(0, ids.shape[0], batch_size):
        chunk = ids[s:s + batch_size].to(model.device)
        acts = site_activations(model, site, chunk)
        q = query if query.ndim == 1 else query[s:s + batch_size]
        d, p = sample_distances(acts, q.to(acts.device), model.task.special_positions(chunk), metric)
        dists.append(d.cpu())
        where.append(p.cpu())
    return torch.cat(dists), torch.cat(where)


@dataclass
class Inversion(JsonResult):
    """Samples for one query, verified, sorted by distance (closest first)."""

    site: Site
    query: Tensor
    ids: Tensor  # [n, seq]
    texts: list[str]
    distances: Tensor  # [n]
    positions: Tensor  # [n] position of the closest activation
    temps: Tensor
    noise: Tensor
    eps: float
    metric: str
    extra: dict = field(default_factory=dict)

    @property
    def in_eps(self) -> Tensor:
        return self.distances <= self.eps

    @property
    def hit(self) -> bool:
        return bool(self.in_eps.any())

    def to_dict(self, k: int = 100) -> dict:
        """Site, ε, how many samples fell within it, and the ``k`` closest samples (``display``)."""
        return {"site": str(self.site), "eps": self.eps, "metric": self.metric, "n_samples": len(self.texts),
                "n_in_eps": int(self.in_eps.sum()), "hit": self.hit, "closest": self.display(k), **self.extra}

    def display(self, k: int = 100) -> list[dict]:
        """The ``k`` closest samples (unique texts kept in order) with their distances."""
        rows, seen = [], set()
        for i in range(len(self.texts)):
            if self.texts[i] in seen:
                continue
            seen.add(self.texts[i])
            rows.append({"text": self.texts[i], "distance": float(self.distances[i]),
                         "in_eps": bool(self.distances[i] <= self.eps), "position": int(self.positions[i]),
                         "index": i})
            if len(rows) >= k:
                break
        return rows


def invert_activation(td: TrainedDecoder, site: Site | str, query: Tensor, n_per_cell: int = 256,
                      grid: Sequence[tuple[float, float]] = PAPER_GRID, metric: str = "l2",
                      eps: float | None = None, seed: int = 0, batch_size: int = 1024) -> Inversion:
    """Sample ``n_per_cell`` inputs at each (temperature, noise) cell, verify them, sort by distance."""
    s = parse_site(site) if isinstance(site, str) else site
    idx = td.site_index(s)
    query = torch.as_tensor(query, dtype=torch.float32)
    if query.ndim != 1:
        raise CircuitkitError(f"a query activation is one vector, got shape {tuple(query.shape)}")
    td.check_activation(query)
    check_metric(metric)
    eps = DEFAULT_EPS[metric] if eps is None else eps
    dev = next(td.decoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    acts, temps = grid_queries(query.to(dev), n_per_cell, grid, gen)
    noise = torch.cat([torch.full((n_per_cell,), float(sc)) for _, sc in grid])
    ids = sample(td.decoder, acts, idx, temps, special_ids(td.probed), gen, batch_size=batch_size).cpu()
    dist, pos = verify(td.probed, s.at(None), ids, query, metric)
    order = torch.argsort(dist, stable=True)
    ids, dist, pos = ids[order], dist[order], pos[order]
    texts = [td.probed.task.decode(r) for r in ids.tolist()]
    return Inversion(s, query, ids, texts, dist, pos, temps.cpu()[order], noise[order], eps, metric)


def invert_pool(model: ProbedModel, pool, site: Site, text: str, metric: str = "l2") -> Inversion:
    """The exact ε-preimage of ``site`` (with a position) on ``text`` over a ``PoolPreimage``'s inputs and the
    query itself, sorted by distance: the decoder-free counterpart of ``invert_text``."""
    from circuitkit.activations import collect_activations

    task, node = model.task, site.at(None)
    q_ids = task.encode([text])
    q_acts = collect_activations(model, q_ids, [node])[node]  # [1, pos, d]
    query = q_acts[0, int(task.position_indices(q_ids, site.position)[0])]
    keep = [i for i, t in enumerate(pool.pool) if t != text]  # the query comes first, once
    texts = [text] + [pool.pool[i] for i in keep]
    ids = torch.cat([q_ids, pool.ids[keep]])
    acts = torch.cat([q_acts, pool.pool_activations(site)[keep]])
    dist, where = sample_distances(acts, query, task.special_positions(ids), metric)
    order = torch.argsort(dist, stable=True)
    zeros = torch.zeros(len(texts))
    inv = Inversion(site, query, ids[order], [texts[i] for i in order.tolist()], dist[order], where[order], zeros,
                    zeros, DEFAULT_EPS[metric], metric)
    inv.extra.update({"input": text, "source": "pool", "pool_size": len(pool.pool)})
    return inv


def invert_text(td: TrainedDecoder, site: Site | str, text: str, **kw) -> Inversion:
    """Invert the activation of ``site`` (with a position) on input ``text``."""
    s = parse_site(site) if isinstance(site, str) else site
    td.site_index(s)
    inv = invert_activation(td, s, query_activation(td.probed, s, text), **kw)
    inv.extra["input"] = text
    return inv
