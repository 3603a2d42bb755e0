"""What same-layout resampling cannot see: components and paths that no aligned source changes, tested by zero
ablation.

Interchange and resample tests draw sources of the base's layout.  A component whose output is the same on every
base and its source (constant given the layout: tracr-reverse's length sub-circuit at a fixed length), or a path
along which no source changes anything (a head's query and key that read only positions), is never moved by them,
so the circuit cannot hold it whatever it does.  This pass looks for exactly those and tests them with zero
ablation, the ablation that can see them:

| step  | tested                                                                                   | kept when |
|-------|------------------------------------------------------------------------------------------|-----------|
| nodes | each head and MLP at a position the circuit uses, not a node yet, whose output is the same on every same-layout pair (largest change ≤ ``CONSTANT``) and is not zero | zeroing it there changes an answer: change-rate CI low ≥ ``min_edge`` |
| edges | each ordered pair of component or embedding nodes with no edge that can send (the embeddings at every named position, BOS's too), where same-layout path patching moves no logit (≤ ``CONSTANT``) or either end is structural; and structural nodes into the answers read at their position | zeroing the sender along the path into the receiver only changes an answer: CI low ≥ ``min_edge`` |
| inputs (``split_inputs``) | each kept zero-ablation edge into a head, through its query, key and value alone; and each same-layout edge into a head, through the inputs its own split did not find and that no same-layout source moves | the same, through that input alone; the edge's ``inputs`` name those kept (``q+k+v`` when none is alone) |

Structural nodes carry no label (no same-layout test can say what they carry: it is a function of the layout) and
are marked ``structural``; their edges, and the zero-ablation edges between other nodes, have ``kind =
"structural"`` and ``ablation = "zero"``.  Resample evaluation leaves a constant component as it is, so the
circuit's faithfulness and explained share do not change.  Zero ablation takes the model off its input
distribution: a structural node says the answers need the component, not what it computes.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.circuit.graph import (
    CircuitNode,
    EdgeResult,
    add_edge,
    add_site_node,
    aligned_resample_pairs,
    answers_after,
    can_send,
    is_containment,
    target_position_names,
    where_both,
)
from circuitkit.patching import engine
from circuitkit.patching.engine import Patch
from circuitkit.patching.path import path_patch_to_site
from circuitkit.sites import Site, parse_site
from circuitkit.stats import proportion
from circuitkit.types import Edge, Node
from circuitkit.verification.interchange import InterchangeVerifier

#: largest change (of an output, or of a logit along a path) still counted as "no source changes it"
CONSTANT = 1e-5
#: site kinds a structural node or an edge end may be: heads, MLPs, and the embeddings as a sender
COMPONENTS = ("head", "mlp_out")


@dataclass(frozen=True)
class ZeroTest:
    """One zero-ablation test, on its best answer: a node (``receiver`` None) or a path sender → receiver."""

    sender: str
    receiver: str | None
    constant_change: float  # the largest change same-layout resampling makes there (output, or logits on the path)
    target: str | None
    effect: float  # change rate of the answer when zeroed
    ci_low: float
    ci_high: float
    n: int
    kept: bool
    receiver_inputs: str | None = None  # a head receiver read only through these (``split_inputs``); None: all

    def to_dict(self) -> dict:
        return asdict(self)


def _is_end(site: Site) -> bool:
    """A site that may be a structural edge's end: a head, an MLP, or (as a sender) the embeddings."""
    return site.kind in COMPONENTS or (site.kind == "resid_pre" and site.layer == 0)


def _rows_with(verifier: InterchangeVerifier, rows: Sequence[int], *sites: Site) -> list[int]:
    """The rows whose input has every site's position."""
    pos = verifier.coder.position
    return [i for i in rows if all(pos(verifier.inputs[i], s.position) is not None for s in sites)]


def _best(verifier: InterchangeVerifier, site: Site, rows: Sequence[int], pred: Tensor
          ) -> tuple[str | None, float, float, float, int]:
    """(answer, change rate, CI low, CI high, n) of the answer that changed most reliably (highest CI low)."""
    best: tuple[str | None, float, float, float, int] = (None, 0.0, 0.0, 0.0, 0)
    for t, x in verifier.changes(site, rows, pred).items():
        if x.size >= 2:
            e = proportion(x)
            if best[0] is None or e.ci_low > best[2]:
                best = (t, round(e.mean, 4), round(e.ci_low, 4), round(e.ci_high, 4), e.n)
    return best


@torch.no_grad()
def constant_outputs(verifier: InterchangeVerifier, sites: Sequence[Site], n_pairs: int, seed: int
                     ) -> dict[str, tuple[float, float]]:
    """{site: (largest change of its output between a base and its same-layout source, largest |output|)} over
    ``n_pairs`` search-split pairs where the site's position exists in both."""
    pm, task = verifier.pm, verifier.task
    bases, sources = aligned_resample_pairs(verifier, n_pairs, random.Random(seed))
    hooks = sorted({s.hook_name for s in sites})
    _, bc = pm.runner.run(verifier.ids[bases].to(pm.device), cache=hooks, return_logits=False)
    _, sc = pm.runner.run(task.encode(sources).to(pm.device), cache=hooks, return_logits=False)
    out = {}
    for s in sites:
        both = [r for r, (b, src) in enumerate(zip(bases, sources, strict=True))
                if verifier.coder.position(verifier.inputs[b], s.position) is not None
                and verifier.coder.position(src, s.position) is not None]
        if not both:
            continue
        bpos = torch.tensor([verifier.coder.position(verifier.inputs[bases[r]], s.position) for r in both])
        spos = torch.tensor([verifier.coder.position(sources[r], s.position) for r in both])
        a = s.select(bc[s.hook_name][both], bpos.to(pm.device))
        b = s.select(sc[s.hook_name][both], spos.to(pm.device))
        out[str(Node.of(s))] = (float((a - b).abs().max()), float(a.abs().max()))
    return out


@torch.no_grad()
def zero_node_pred(verifier: InterchangeVerifier, site: Site, rows: Sequence[int]) -> Tensor:
    """Argmax predictions [n, pos] of the base rows with ``site`` zeroed at its position."""
    pm = verifier.pm
    ids = verifier.ids[list(rows)].to(pm.device)
    pos = verifier.task.position_indices(ids.cpu(), site.position).to(pm.device)
    _, cache = pm.runner.run(ids, cache=[site.hook_name], stop_at_layer=None, return_logits=False)
    value = torch.zeros_like(site.select(cache[site.hook_name], pos))
    logits = engine.run(pm.runner, ids, [Patch(site, pos, value)])
    return logits.argmax(-1).cpu()  # type: ignore[union-attr]


@torch.no_grad()
def _path_is_blind(verifier: InterchangeVerifier, sender: Site, receiver: Site, n_pairs: int, seed: int,
                   receiver_inputs: Sequence[str] | None = None) -> float:
    """The largest change of any logit when ``sender`` is path patched into ``receiver`` (through only
    ``receiver_inputs`` of a head) from same-layout sources (``CONSTANT`` or less: no source moves anything along
    the path)."""
    bases, sources = where_both(verifier, *aligned_resample_pairs(verifier, n_pairs, random.Random(seed)), sender,
                                receiver)
    if not bases:
        return float("inf")
    ids = verifier.ids[bases]
    patched = path_patch_to_site(verifier.pm, ids, verifier.task.encode(sources), sender, receiver,
                                 receiver_inputs=receiver_inputs)
    clean = verifier.pm.runner.logits(ids.to(verifier.pm.device))
    return float((patched - clean).abs().max())


def _edge_test(verifier: InterchangeVerifier, sender: Site, receiver: str, rows: Sequence[int], constant: float,
               min_edge: float, receiver_inputs: str | None = None) -> tuple[ZeroTest, EdgeResult | None]:
    """Zero ``sender`` along the path into ``receiver`` (a site, or ``out:T``: the final residual stream at T's
    position, direct path) on ``rows`` (through only ``receiver_inputs`` of a head, e.g. ``q``); the test and,
    when kept, the edge's result."""
    if receiver.startswith("out:"):
        pos = target_position_names(verifier).get(receiver[4:])
        r_site = Site("resid_post", verifier.pm.n_layers - 1, position=pos)
    else:
        r_site = parse_site(receiver)
    rows = _rows_with(verifier, rows, sender, r_site)
    if len(rows) < 2:
        return ZeroTest(str(Node.of(sender)), receiver, constant, None, 0.0, 0.0, 0.0, len(rows), False,
                        receiver_inputs), None
    logits = path_patch_to_site(verifier.pm, verifier.ids[rows], None, sender, r_site,
                                through_bundle=not receiver.startswith("out:"),
                                receiver_inputs=receiver_inputs.split("+") if receiver_inputs else None)
    pred = logits.argmax(-1).cpu()
    if receiver.startswith("out:"):
        ch = verifier.changes(r_site, rows, pred).get(receiver[4:], np.zeros(0))
        e = proportion(ch) if ch.size >= 2 else None
        t, eff, lo, hi, n = (receiver[4:], round(e.mean, 4), round(e.ci_low, 4), round(e.ci_high, 4), e.n) \
            if e is not None else (None, 0.0, 0.0, 0.0, 0)
    else:
        t, eff, lo, hi, n = _best(verifier, r_site, rows, pred)
    kept = bool(t is not None and lo >= min_edge)
    test = ZeroTest(str(Node.of(sender)), receiver, round(constant, 8), t, eff, lo, hi, n, kept, receiver_inputs)
    res = EdgeResult(str(Node.of(sender)), receiver, "structural (zero ablation)", t, eff, lo, hi, n, None, None,
                     None) if kept and t is not None else None
    return test, res


def structural_pass(verifier: InterchangeVerifier, g: nx.DiGraph, min_edge: float = 0.1, n_pairs: int = 150,
                    seed: int = 0, progress: bool = False, split_inputs: bool = False) -> list[ZeroTest]:
    """Add to ``g`` the structural nodes and zero-ablation edges (module doc); returns every test made.
    ``split_inputs``: a kept edge into a head is tested again through its query, key and value alone, and records
    which carry it (``inputs``; ``q+k+v`` when none does alone), as ``graph.build_circuit`` does."""
    pm = verifier.pm
    rng_seed = zlib.crc32(f"structural|{verifier.seed}|{seed}".encode())
    rows = list(verifier.split_rows["search"])
    random.Random(rng_seed).shuffle(rows)
    rows = rows[:n_pairs]
    nodes = {n: parse_site(n) for n, d in g.nodes(data=True) if d["kind"] == "site"}
    positions = list(dict.fromkeys(s.position for s in nodes.values() if s.position is not None))
    candidates = [Site(kind, L, h, position=p) for p in positions for L in range(pm.n_layers)
                  for kind, h in [("head", h) for h in range(pm.n_heads)] + [("mlp_out", None)]]
    candidates = [s for s in candidates if str(Node.of(s)) not in g]
    tests: list[ZeroTest] = []
    moved = constant_outputs(verifier, candidates, n_pairs, rng_seed) if candidates else {}
    example = verifier.tokens[0]
    structural: set[str] = set()
    for s in candidates:
        name = str(Node.of(s))
        change, size = moved.get(name, (float("inf"), 0.0))
        if change > CONSTANT or size <= CONSTANT:
            continue  # a source moves it (the circuit's own tests saw it), or it writes nothing
        here = _rows_with(verifier, rows, s)
        t, eff, lo, hi, n = _best(verifier, s, here, zero_node_pred(verifier, s, here)) if len(here) >= 2 else \
            (None, 0.0, 0.0, 0.0, len(here))
        kept = bool(t is not None and lo >= min_edge)
        tests.append(ZeroTest(name, None, round(change, 8), t, eff, lo, hi, n, kept))
        if kept:
            add_site_node(g, CircuitNode(name, explained=False, structural=True), example, verifier)
            structural.add(name)
    ends = {n: parse_site(n) for n, d in g.nodes(data=True) if d["kind"] == "site" and _is_end(parse_site(n))}
    # the embeddings at every named position may send (BOS's, read by a head that always attends to it)
    embeddings = {str(Node.of(e)): e for e in (Site("resid_pre", 0, position=p) for p in verifier.task.position_names)
                  if str(Node.of(e)) not in g}
    index = {n: g.nodes[n]["index"] for n in ends}
    for n, e in embeddings.items():
        index[n] = _index(verifier, e)
    parallel, last = pm.runner.arch.parallel, 2 * pm.n_layers + 1
    pairs = [(a, sa, b, sb) for a, sa in {**ends, **embeddings}.items() for b, sb in ends.items()
             if sb.kind in COMPONENTS and not g.has_edge(a, b) and can_send(sa, sb, parallel)
             and not is_containment(sa, sb, parallel) and not (verifier.causal and index[a] > index[b] >= 0)]
    for a, sa, b, sb in tqdm(pairs, desc="structural paths", unit="path", disable=not progress):
        change = 0.0 if a in structural or b in structural else \
            _path_is_blind(verifier, sa, sb, n_pairs, zlib.crc32(f"{a}->{b}|{rng_seed}".encode()))
        if change > CONSTANT:
            continue  # same-layout path patching sees this path: build_circuit's test stands
        test, res = _edge_test(verifier, sa, b, rows, change, min_edge)
        tests.append(test)
        if res is not None:
            if a not in g:  # an embedding position the circuit had no node at
                add_site_node(g, CircuitNode(a, explained=False, structural=True), example, verifier)
            _mark(g, verifier, a, b, res, last)
            if split_inputs and sb.kind == "head":
                per = [_edge_test(verifier, sa, b, rows, change, min_edge, x)[0] for x in "qkv"]
                tests += per
                g.edges[a, b]["inputs"] = "+".join(x for x, z in zip("qkv", per, strict=True) if z.kept) or "q+k+v"
    if split_inputs:
        tests += _complete_inputs(verifier, g, ends, rows, n_pairs, rng_seed, min_edge)
    tpos = target_position_names(verifier)
    for a in sorted(structural):
        for t, p in tpos.items():
            if str(ends[a].position) == p and t in answers_after(verifier, ends[a]):
                test, res = _edge_test(verifier, ends[a], f"out:{t}", rows, 0.0, min_edge)
                tests.append(test)
                if res is not None:
                    _mark(g, verifier, a, f"out:{t}", res, last)
    g.graph["structural_rule"] = (f"zero ablation where no same-layout source moves anything (largest change <= "
                                  f"{CONSTANT}): node or path kept when an answer's change-rate CI low >= {min_edge}")
    return tests


def _index(verifier: InterchangeVerifier, site: Site) -> int:
    """The site's position index on the verifier's first input (-1 where it has none)."""
    p = verifier.coder.position(verifier.inputs[0], site.position)
    return -1 if p is None else p


def _complete_inputs(verifier: InterchangeVerifier, g: nx.DiGraph, ends: dict[str, Site], rows: Sequence[int],
                     n_pairs: int, seed: int, min_edge: float) -> list[ZeroTest]:
    """For each same-layout edge into a head between component or embedding nodes, the inputs (query, key, value)
    its own split did not find and along which no same-layout source moves a logit: tested by zero ablation, and
    added to the edge's ``inputs`` when kept (a head's query and key that read only positions)."""
    tests = []
    for a, b, d in list(g.edges(data=True)):
        if d.get("kind") != "path" or "inputs" not in d or a not in ends or b not in ends or ends[b].kind != "head":
            continue
        found = set(d["inputs"].split("+"))
        for x in "qkv":
            if x in found:
                continue
            change = _path_is_blind(verifier, ends[a], ends[b], n_pairs, zlib.crc32(f"{a}->{b}<{x}>|{seed}".encode()),
                                    (x,))
            if change > CONSTANT:
                continue
            test, _ = _edge_test(verifier, ends[a], b, rows, change, min_edge, x)
            tests.append(test)
            if test.kept:
                found.add(x)
        g.edges[a, b]["inputs"] = "+".join(x for x in "qkv" if x in found)
    return tests


def _mark(g: nx.DiGraph, verifier: InterchangeVerifier, a: str, b: str, res: EdgeResult, last: int) -> None:
    """Add a kept zero-ablation edge a → b, marked as such."""
    add_edge(g, verifier, Edge.of(a, b), res, last)
    g.edges[a, b]["kind"] = "structural"
    g.edges[a, b]["ablation"] = "zero"


__all__ = ["CONSTANT", "ZeroTest", "constant_outputs", "structural_pass", "zero_node_pred"]
