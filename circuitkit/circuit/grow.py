"""Greedy circuit growth to a faithfulness target, and MIB-style faithfulness curves (CPR, CMD).

Everything here reuses one ``AblationEvaluator`` (same inputs, same aligned sources, same caches), so
every number is the normalised logit-difference faithfulness of ``circuitkit.circuit.evaluate``:
f(X) = (m(X) − m(∅)) / (m(M) − m(∅)), m = mean logit difference.

Growth.  Start from ``start_sites`` (the verified nodes; a residual site is a bundle, as in the
evaluator: every head and MLP written into the residual stream at its position up to its depth, computed
live, nothing restored).  Candidates that the start sites already cover entirely (e.g. a head inside a
start bundle) are skipped and listed as ``covered``.  Rank the other candidates by their single-node
effect F(M) − F(M∖{v}) (only v ablated in the full model, pooled mean LD), largest first.  Add them in
that order, one at a time, until f reaches
``target`` on "all" and on every target name (a target whose normalisation is undefined is not
checked), or the candidates run out.  Then prune: walk the added nodes in reverse order and drop each
one whose removal keeps the criterion (when the target is not reached: whose removal costs no answer more than
``slack`` of the faithfulness reached, so nodes that added nothing are not kept).  The nodes that growth added are not explained by the
verified hypotheses: the caller labels them as such.

Curves (Mueller et al. 2025, MIB).  Node universe U = every component (each head and each MLP) at
every named position of the task, plus one lumped node "rest" = every component at the positions that
have no name in an input.  Order = the start sites, then the added nodes, then the remaining nodes of U
by single-node effect, then "rest".  A start or added site stands for the nodes of U it covers: a head
or MLP itself (at every named position if it has no position), a residual site the components of its
bundle at its named position (x{L}.post@p -> every head and MLP of layers <= L at p, ...), so a residual
start site's bundle components count as part of the order's prefix, one node of U each.  Embedding
sites and sites at unnamed or integer positions cover no node of U and are listed as ``excluded``.
f_k = f(first k nodes of the order kept live, everything else ablated), x_k = k / |U| (f_0 = 0:
nothing kept; f_|U| = 1: the full model).
    CPR = ∫ f dx          (trapezoid rule; higher is better)
    CMD = ∫ |1 − f| dx    (trapezoid rule; lower is better)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from circuitkit.circuit.evaluate import HEAD_KINDS, MLP_KINDS, AblationEvaluator, as_sites, bundle_components, site_role
from circuitkit.results import JsonResult, to_jsonable
from circuitkit.sites import Site

DEFINITIONS = (__doc__ or "").split("\n", 1)[1].strip()
REST = "rest"


def named_components(evaluator: AblationEvaluator, positions: Sequence[str] | None = None) -> list[Site]:
    """Every head (a{L}.{H}) and MLP (m{L}) at every named position of the task (the growth
    candidates and the MIB node universe without "rest"), in (position, layer, head, MLP) order."""
    positions = list(positions) if positions is not None else list(evaluator.task.position_names)
    out = []
    for p in positions:
        for L in range(evaluator.L):
            out += [Site("head", L, h, p) for h in range(evaluator.H)]
            out.append(Site("mlp_out", L, None, p))
    return out


def units_of(site: Site, positions: Sequence[str], n_heads: int) -> list[Site]:
    """The universe nodes (a head or an MLP at one named position) a site stands for: a component
    itself, a residual site its bundle's components (in forward order); [] if none (embedding sites,
    integer or unknown positions)."""
    if site_role(site) == "residual":
        out: list[Site] = []
        for c in bundle_components(site, n_heads):
            out += [u for u in units_of(c, positions, n_heads) if u not in out]
        return out
    if site_role(site) != "component":
        return []
    if site.position is None:
        pos = list(positions)
    elif site.position in positions:
        pos = [site.position]
    else:
        return []
    if site.kind in HEAD_KINDS:
        comps = [Site("head", site.layer, site.head)]
    elif site.kind in MLP_KINDS:
        comps = [Site("mlp_out", site.layer)]
    else:  # attn_out: every head of the layer
        comps = [Site("head", site.layer, h) for h in range(n_heads)]
    return [c.at(p) for p in pos for c in comps]


def _meets(f: dict[str, float], target: float) -> bool:
    if f.get("all") is None or f["all"] != f["all"]:
        return False
    return all(v >= target for v in f.values() if v == v)


@dataclass
class GrowthResult(JsonResult):
    start: list[str]
    added: list[str]  # kept after pruning, in the order they were added
    added_before_prune: list[str]
    pruned: list[str]
    steps: list[dict[str, Any]]  # k, site added (None at k = 0), circuit size, faithfulness per target
    faithfulness: dict[str, float]  # of start + added (after pruning)
    reached: bool
    target: float
    effects: dict[str, float]  # candidate -> F(M) − F(M∖{v})
    ranking: list[str]  # candidates, largest effect first
    covered: list[str] = field(default_factory=list)  # candidates the start sites already cover (skipped)
    definitions: str = field(default=DEFINITIONS)

    @property
    def sites(self) -> list[str]:
        return self.start + self.added

    def plot_data(self) -> dict[str, Any]:
        """Keyword arguments for ``circuitkit.report.figures.line_plot``: faithfulness against size."""
        xs = [s["size"] for s in self.steps]
        keys = list(self.steps[0]["faithfulness"]) if self.steps else ["all"]
        series = {k: [s["faithfulness"].get(k, float("nan")) for s in self.steps] for k in keys}
        return {"xs": xs, "series": series, "title": "Circuit growth (before pruning)",
                "xlabel": "circuit size (sites)", "ylabel": "normalised LD faithfulness", "hline": self.target}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = self.sites
        d["plot"] = self.plot_data()
        return to_jsonable(d)


def _within(f: dict[str, float], best: dict[str, float], slack: float) -> bool:
    """Every answer's faithfulness at most ``slack`` below ``best`` (undefined ones ignored)."""
    return all(f.get(k) is not None and f[k] == f[k] and f[k] >= v - slack for k, v in best.items() if v == v)


def grow_circuit(evaluator: AblationEvaluator, start_sites: Iterable[Site | str], candidates: Iterable[Site | str],
                 target: float = 0.9, prune: bool = True, slack: float = 0.005) -> GrowthResult:
    """Greedily add ``candidates`` (largest single-node effect first) to ``start_sites`` until the
    normalised LD faithfulness reaches ``target`` on "all" and every target; then prune (module doc)."""
    ev = evaluator
    start = as_sites(start_sites)
    have = {str(s) for s in start}
    start_mask = ev.mask(start)
    cands, covered = [], []
    for c in as_sites(candidates):
        if str(c) in have:
            continue
        new = ev.mask([c]) & ~start_mask
        if bool(new.heads.any()) or bool(new.mlps.any()):
            cands.append(c)
        else:
            covered.append(c)
    effects = {str(c): ev.single_effect(c) for c in cands}
    order = sorted(range(len(cands)), key=lambda i: -effects[str(cands[i])])  # stable: ties keep input order
    ranking = [cands[i] for i in order]
    cur = list(start)
    f = ev.faithfulness(cur)
    steps = [{"k": 0, "site": None, "size": len(cur), "faithfulness": f}]
    added: list[Site] = []
    for c in ranking:
        if _meets(f, target):
            break
        cur.append(c)
        added.append(c)
        f = ev.faithfulness(cur)
        steps.append({"k": len(added), "site": str(c), "size": len(cur), "faithfulness": f})
    reached = _meets(f, target)
    kept = list(added)
    pruned: list[Site] = []
    if prune:
        # reached: keep the criterion; not reached: keep what was achieved (within ``slack`` on every answer),
        # so nodes that added nothing are not reported as part of the circuit
        goal = target if reached else None
        best = dict(f)
        for c in reversed(added):
            trial = [s for s in kept if s != c]
            ft = ev.faithfulness(start + trial)
            ok = _meets(ft, goal) if goal is not None else _within(ft, best, slack)
            if ok:
                kept = trial
                pruned.append(c)
    final = ev.faithfulness(start + kept)
    return GrowthResult(start=[str(s) for s in start], added=[str(s) for s in kept],
                        added_before_prune=[str(s) for s in added], pruned=[str(s) for s in pruned], steps=steps,
                        faithfulness=final, reached=_meets(final, target), target=target, effects=effects,
                        ranking=[str(s) for s in ranking], covered=[str(s) for s in covered])


@dataclass
class FaithfulnessCurve(JsonResult):
    order: list[str]  # the node universe in curve order; the last node is "rest"
    n_universe: int
    ks: list[int]  # prefix sizes evaluated
    xs: list[float]  # k / |U|
    ys: list[float]  # normalised LD faithfulness ("all") of the first k nodes
    per_target: dict[str, list[float]]
    cpr: float
    cmd: float
    excluded: list[str]  # start / added sites that cover no node of U (embedding, unnamed positions)
    definitions: str = field(default=DEFINITIONS)

    def plot_data(self) -> dict[str, Any]:
        """Keyword arguments for ``circuitkit.report.figures.line_plot``."""
        return {"xs": self.xs, "series": {"all": self.ys}, "title": f"Faithfulness curve (CPR {self.cpr:.3f}, "
                f"CMD {self.cmd:.3f})", "xlabel": "fraction of nodes kept (k / |U|)",
                "ylabel": "normalised LD faithfulness", "hline": 1.0}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plot"] = self.plot_data()
        return to_jsonable(d)


def _trapezoid(xs: np.ndarray, ys: np.ndarray) -> float:
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def faithfulness_curve(evaluator: AblationEvaluator, growth: GrowthResult | None = None,
                       start_sites: Iterable[Site | str] = (), added: Iterable[Site | str] = (),
                       positions: Sequence[str] | None = None, max_points: int | None = None) -> FaithfulnessCurve:
    """The MIB faithfulness curve, CPR and CMD (module doc).  ``growth`` supplies the start and added
    sites (else ``start_sites`` / ``added``); ``max_points`` evaluates only that many evenly spaced
    prefix sizes (always including 0 and |U|) for large universes."""
    ev = evaluator
    positions = list(positions) if positions is not None else list(ev.task.position_names)
    if growth is not None:
        start_sites, added = growth.start, growth.added
    universe = named_components(ev, positions)
    in_u = {str(u) for u in universe}
    order: list[str] = []
    excluded: list[str] = []
    for s in as_sites(list(start_sites) + list(added)):
        units = [u for u in units_of(s, positions, ev.H) if str(u) in in_u]
        if not units:
            excluded.append(str(s))
        order += [str(u) for u in units if str(u) not in order]
    rest = [u for u in universe if str(u) not in order]
    eff = {str(u): ev.single_effect(u) for u in rest}
    order += [str(u) for u in sorted(rest, key=lambda u: -eff[str(u)])]
    order.append(REST)
    n_u = len(order)
    ks = list(range(n_u + 1))
    if max_points is not None and max_points < n_u + 1:
        ks = sorted({int(round(v)) for v in np.linspace(0, n_u, max(2, max_points))})
    masks = {}
    for name in order:
        masks[name] = ev.rest_mask() if name == REST else ev.mask([name])
    keys = ev.target_names + ["all"]
    per_target: dict[str, list[float]] = {k: [] for k in keys}
    ys: list[float] = []
    cur = ev.none_mask()
    done = 0
    for k in ks:
        while done < k:
            cur = cur | masks[order[done]]
            done += 1
        f = ev.normalized(ev.run(cur), ci=False)[0]
        ys.append(f["all"])
        for t in keys:
            per_target[t].append(f[t])
    xs = [k / n_u for k in ks]
    x, y = np.array(xs), np.array(ys, dtype=float)
    return FaithfulnessCurve(order=order, n_universe=n_u, ks=ks, xs=xs, ys=ys, per_target=per_target,
                             cpr=_trapezoid(x, y), cmd=_trapezoid(x, np.abs(1.0 - y)), excluded=excluded)


__all__ = ["GrowthResult", "FaithfulnessCurve", "grow_circuit", "faithfulness_curve", "named_components",
           "units_of", "REST", "DEFINITIONS"]
