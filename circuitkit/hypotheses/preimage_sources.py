"""Where ε-preimages come from.  Hypothesis scoring only needs, per query, the member inputs (with
the position where each matched the query) and baseline inputs (outside ε, or random).

* ``PoolPreimage``: exact, no decoder — run a large pool of task-generated inputs through the
  probed model and keep those whose InversionView distance to the query is ≤ ε.
* ``DecoderPreimage``: an adapter over ``circuitkit.inversion`` (decoder samples, re-run through
  the probed model by the inversion code itself).

Distance (InversionView): min over a sample's non-special positions p of ‖a_p(x) − q‖₂ / ‖q‖₂.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from circuitkit.activations import collect_activations
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site, check_site

DEFAULT_EPS = 0.1


@dataclass(frozen=True)
class Sample:
    """An input near (member) or not near (baseline) a query, with the position it matched at."""

    text: str
    position: int
    distance: float


@dataclass
class QueryPreimage:
    """The ε-preimage of one query activation, plus baseline inputs to compare with."""

    query: str
    position: int  # where the query activation was read
    members: list[Sample]
    baseline: list[Sample]
    n_candidates: int = 0  # how many inputs were checked
    n_members_total: int = 0  # before capping
    extra: dict = field(default_factory=dict)


class PreimageSource(Protocol):
    name: str
    eps: float

    def preimages(self, site: Site, queries: Sequence[str]) -> list[QueryPreimage]:
        """One QueryPreimage per query for ``site`` (which has a position)."""


def _distances(acts: Tensor, query: Tensor, special: Tensor) -> tuple[Tensor, Tensor]:
    """(distance [n], argmin position [n]) of acts [n, pos, d] to query [d] over non-special positions.

    Uses ``circuitkit.inversion.distance.sample_distances`` (same definition as the decoder path).
    """
    try:
        from circuitkit.inversion.distance import sample_distances
    except ImportError:  # pragma: no cover - inversion package absent in a trimmed build
        d = (acts - query).norm(dim=-1) / query.norm().clamp_min(1e-12)
        d = d.masked_fill(special, float("inf"))
        return d.min(dim=1)
    return sample_distances(acts, query, special, "l2")


class _SelectionLimits:
    """What every preimage source shares: ε, the caps on members and baseline inputs per query, the seed."""

    def __init__(self, eps: float, max_members: int, max_baseline: int, seed: int) -> None:
        self.eps = eps
        self.max_members = max_members
        self.max_baseline = max_baseline
        self.seed = seed


class PoolPreimage(_SelectionLimits):
    """Exact ε-preimages over a pool of task-generated inputs (no decoder needed).

    pool: texts (default: ``pool_size`` fresh inputs from ``task.generate`` with ``seed``).
    Members are capped at ``max_members`` per query and baseline inputs (pool inputs outside ε,
    at their closest position) at ``max_baseline``; both sampled at random when there are more.
    When no pool input lies outside ε the baseline is random pool inputs read at the query's
    position.
    """

    name = "pool"

    def __init__(self, model: ProbedModel, pool: Sequence[str] | None = None, pool_size: int = 20000,
                 eps: float = DEFAULT_EPS, max_members: int = 64, max_baseline: int = 256, seed: int = 0,
                 batch_size: int = 1024) -> None:
        super().__init__(eps, max_members, max_baseline, seed)
        self.model = model
        self.batch_size = batch_size
        if pool is None:
            pool = model.task.generate(random.Random(10_000 + seed), pool_size)
        self.pool = list(dict.fromkeys(pool))  # unique, order kept
        if not self.pool:
            raise CircuitkitError("the preimage pool is empty")
        self.ids = model.task.encode(self.pool)
        self.special = model.task.special_positions(self.ids)
        self._acts: dict[Site, Tensor] = {}

    def pool_activations(self, site: Site) -> Tensor:
        """[n_pool, pos, d] activations of ``site`` at every position (cached per site)."""
        node = site.at(None)
        if node not in self._acts:
            self._acts = {}  # keep one site in memory at a time
            self._acts[node] = collect_activations(self.model, self.ids, [node], self.batch_size)[node]
        return self._acts[node]

    @torch.no_grad()
    def preimages(self, site: Site, queries: Sequence[str]) -> list[QueryPreimage]:
        if site.position is None:
            raise CircuitkitError(f"site {site} needs a position (e.g. {site.node}@{self.model.task.position_names[-1]})")
        check_site(site, self.model.n_layers, self.model.n_heads)
        if site.kind == "pattern":
            raise CircuitkitError("attention-pattern sites have no fixed width across positions; use a{L}.{H} or z{L}.{H}")
        task = self.model.task
        acts = self.pool_activations(site)
        q_ids = task.encode(list(queries))
        q_pos = task.position_indices(q_ids, site.position)
        q_acts = collect_activations(self.model, q_ids, [site.at(None)], self.batch_size)[site.at(None)]
        rng = random.Random(self.seed)
        out = []
        text_index = {t: i for i, t in enumerate(self.pool)}
        for qi, text in enumerate(queries):
            q = q_acts[qi, int(q_pos[qi])]
            dist, where = _distances(acts, q, self.special)
            member = dist <= self.eps
            own = text_index.get(text)
            if own is not None:
                member[own] = False
            m_idx = member.nonzero().flatten().tolist()
            b_idx = (~member & torch.isfinite(dist)).nonzero().flatten().tolist()
            if own is not None and own in b_idx:
                b_idx.remove(own)
            n_m = len(m_idx)
            if len(m_idx) > self.max_members:
                m_idx = rng.sample(m_idx, self.max_members)
            random_baseline = not b_idx
            if random_baseline:
                b_idx = [i for i in range(len(self.pool)) if i != own]
            if len(b_idx) > self.max_baseline:
                b_idx = rng.sample(b_idx, self.max_baseline)
            members = [Sample(self.pool[i], int(where[i]), float(dist[i])) for i in m_idx]
            if random_baseline:
                pos_b = task.position_indices(self.ids[b_idx], site.position).tolist() if b_idx else []
                baseline = [Sample(self.pool[i], int(p), float(dist[i])) for i, p in zip(b_idx, pos_b)]
            else:
                baseline = [Sample(self.pool[i], int(where[i]), float(dist[i])) for i in b_idx]
            out.append(QueryPreimage(text, int(q_pos[qi]), members, baseline, len(self.pool), n_m,
                                     {"random_baseline": random_baseline}))
        return out


class DecoderPreimage(_SelectionLimits):
    """ε-preimages from an InversionView decoder (``circuitkit.inversion``): its samples, re-run
    through the probed model by ``invert_text``, split at ε into members and baseline (near misses).
    """

    name = "decoder"

    def __init__(self, decoder, n_per_cell: int = 256, eps: float = DEFAULT_EPS, max_members: int = 64,
                 max_baseline: int = 256, seed: int = 0) -> None:
        from circuitkit.inversion.preimage import invert_text  # noqa: F401 - fail early if absent

        super().__init__(eps, max_members, max_baseline, seed)
        self.decoder = decoder
        self.n_per_cell = n_per_cell

    def preimages(self, site: Site, queries: Sequence[str]) -> list[QueryPreimage]:
        from circuitkit.inversion.preimage import invert_text

        task = self.decoder.probed.task
        rng = random.Random(self.seed)
        out = []
        for qi, text in enumerate(queries):
            inv = invert_text(self.decoder, site, text, n_per_cell=self.n_per_cell, eps=self.eps, seed=self.seed + qi)
            pos = task.resolve_position(site.position, task.tokens(text))
            rows = [Sample(t, int(p), float(d)) for t, p, d in zip(inv.texts, inv.positions.tolist(),
                                                                    inv.distances.tolist()) if t != text]
            members = [s for s in rows if s.distance <= self.eps]
            baseline = [s for s in rows if s.distance > self.eps and s.distance != float("inf")]
            n_m = len(members)
            if len(members) > self.max_members:
                members = rng.sample(members, self.max_members)
            if len(baseline) > self.max_baseline:
                baseline = rng.sample(baseline, self.max_baseline)
            out.append(QueryPreimage(text, pos, members, baseline, len(inv.texts), n_m))
        return out


class RoutedPreimage:
    """Decoder preimages at the sites the decoder was trained on; exact pool preimages elsewhere (e.g. the
    MLP outputs of a multi-head model, which the paper's decoders do not decode).  ``used`` records which
    source served each site."""

    def __init__(self, decoder_source: DecoderPreimage, pool_source: PoolPreimage, decoded: Sequence[str]) -> None:
        self.decoder_source, self.pool_source = decoder_source, pool_source
        self.decoded = {str(x).split("@")[0] for x in decoded}
        self.eps = decoder_source.eps
        self.name = "decoder (pool where the decoder has no site)"
        self.used: dict[str, str] = {}

    def preimages(self, site: Site, queries: Sequence[str]) -> list[QueryPreimage]:
        src = self.decoder_source if site.node in self.decoded else self.pool_source
        self.used[str(site)] = src.name
        return src.preimages(site, queries)


__all__ = ["Sample", "QueryPreimage", "PreimageSource", "PoolPreimage", "DecoderPreimage", "RoutedPreimage",
           "DEFAULT_EPS"]
