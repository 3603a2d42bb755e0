"""Fresh (input, site, position, activation) training pairs, and held-out queries.

Every call draws new inputs from the task's training split (held-out queries come from the test
split, so a query's own input is never a training example), runs the probed model once for the
whole batch, only as far as the chosen site needs (``stop_at_layer``), and reads the site at one
random non-special position per input.  ``PairSource.mixed`` draws a site per input instead (one
forward reads them all), so a batch mixes sites.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site


@dataclass
class Pairs:
    """A batch for one site: ids [n, seq_len], positions [n], activations [n, d]."""

    site: Site
    ids: Tensor
    positions: Tensor
    acts: Tensor


@torch.no_grad()
def site_activations(model: ProbedModel, site: Site, ids: Tensor) -> Tensor:
    """The site's activation at every position: [n, seq_len, d] (one forward, stopped early)."""
    _, cache = model.runner.run(ids.to(model.device), cache=[site.hook_name], stop_at_layer=site.stop_layer,
                                return_logits=False)
    return site.at(None).select(cache[site.hook_name])


def random_nonspecial_positions(special: Tensor, gen: torch.Generator) -> Tensor:
    """One uniformly random False position per row of ``special`` [n, pos] (bool) -> [n]."""
    w = (~special).float()
    w[w.sum(1) == 0] = 1.0  # a row of only specials: any position (cannot happen for task inputs)
    return torch.multinomial(w.cpu(), 1, generator=gen).squeeze(1).to(special.device)


class PairSource:
    """Draws batches of training pairs (from ``split``) for any site of a probed model."""

    def __init__(self, model: ProbedModel, split: str = "train", seed: int = 0) -> None:
        self.model = model
        self.task = model.task
        self.texts: Sequence[str] = self.task.split(split)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def inputs(self, n: int) -> Tensor:
        batch = [self.texts[self.rng.randrange(len(self.texts))] for _ in range(n)]
        return self.task.encode(batch)

    def batch(self, site: Site, n: int) -> Pairs:
        ids = self.inputs(n).to(self.model.device)
        acts = site_activations(self.model, site, ids)
        pos = random_nonspecial_positions(self.task.special_positions(ids), self.gen)
        return Pairs(site, ids, pos, acts[torch.arange(n, device=acts.device), pos])

    @torch.no_grad()
    def mixed(self, sites: Sequence[Site], weights: Sequence[float], n: int) -> tuple[Pairs, Tensor]:
        """A batch whose inputs each get a site drawn with ``weights``: (pairs, site index [n]).

        ``pairs.site`` is the first site; the activation of row r is of ``sites[index[r]]``.  The probed model
        runs without autograd: it is fixed, and a graph through it would let the decoder's loss reach it."""
        ids = self.inputs(n).to(self.model.device)
        hooks = sorted({s.hook_name for s in sites})
        _, cache = self.model.runner.run(ids, cache=hooks, stop_at_layer=max(s.stop_layer for s in sites),
                                         return_logits=False)
        idx = torch.multinomial(torch.tensor(weights, dtype=torch.float), n, replacement=True, generator=self.gen)
        pos = random_nonspecial_positions(self.task.special_positions(ids), self.gen)
        acts = torch.empty(n, self.model.runner.d_model, device=ids.device)
        for j, s in enumerate(sites):
            rows = (idx == j).nonzero().squeeze(1).to(ids.device)
            if len(rows):
                acts[rows] = s.at(None).select(cache[s.hook_name][rows])[torch.arange(len(rows)), pos[rows]]
        return Pairs(sites[0], ids, pos, acts), idx.to(ids.device)

    def state(self) -> dict:
        return {"py_rng": self.rng.getstate(), "gen": self.gen.get_state()}

    def load_state(self, state: dict) -> None:
        self.rng.setstate(state["py_rng"])
        self.gen.set_state(state["gen"])


def held_out_queries(model: ProbedModel, site: Site, n: int, seed: int = 1234) -> Pairs:
    """``n`` query activations from the test split (fixed for a seed): the eval set of a site."""
    return PairSource(model, split="test", seed=seed).batch(site, n)


@torch.no_grad()
def activation_scale(model: ProbedModel, site: Site, n: int = 512, seed: int = 0) -> float:
    """RMS per coordinate of the site's activations at non-special positions."""
    p = PairSource(model, seed=seed).batch(site, n)
    return float(p.acts.pow(2).mean().sqrt().clamp_min(1e-6))
