"""Edge-level faithfulness: the circuit run in which circuit nodes talk only along the given edges.

Nodes.  Every residual node (x{L}.pre / .mid / .post at a position: a bundle, see
``circuitkit.circuit.evaluate``) is first expanded into its bundle's components: every head and MLP
written into the residual stream at its position up to its depth, each a node computed live (nothing is
restored).  A bundle component that an explicit component node (or an earlier bundle) already holds at
the same rows is that node (de-duplicated: where the coverage is partial the new node keeps only the
rows not yet held); ``expanded_nodes`` lists, for each residual node, the nodes that stand for its
bundle.  Embedding sites (emb, pos, x0.pre) are never ablated and cover no component.

Edges.  An edge s → r between circuit nodes is expanded to the component nodes: s' → r' for every s' in
s's expansion (s itself, or its bundle) and every r' in r's expansion with s' written at or before r'
reads (the depth order; a sender at a later position than the receiver is allowed but carries nothing
through the causal attention mask); an edge r → out:T becomes c → out:T for every c in r's expansion.
Every bundle also gets its complete internal edges (c1 → c2 whenever c1 writes at or before c2 reads),
whether listed or not.  ``expanded_edges`` lists the component-level edges that were run.

Run.  Let R0 be the residual stream of the fully ablated run (the base's embeddings plus every
component's output on the aligned source), at every depth (0 = embeddings; layer L's attention reads
depth 2L and writes 2L+1, its MLP reads 2L+1 (2L with a parallel residual) and writes 2L+2; the final stream
is depth 2·n_layers).
The component nodes are processed in depth order; node r reads

    input_r = R0[read depth of r] + Σ over expanded edges s→r of Δs   (Δs placed at s's rows)

where Δs = out_s(this run) − out_s(source) (a head's result z_h W_O[h], an MLP's output, at the node's
rows).  A head receiver computes its q at its rows and its k, v at every row from input_r (one
forward of its layer from input_r); an MLP receiver computes its output at its rows from input_r.
Edges s → "out:T" put Δs into the final residual stream (at s's own rows: a node at another position
than target T's cannot move T's logits); target T's logits are read from R0[final] + Σ_{s→out:T} Δs.
Edges from embedding sites carry nothing (they are part of R0), edges into them are ignored; so are
edges between non-nodes, to unknown targets or with no pair in the depth order, unless ``strict``
(all listed in ``ignored_edges`` with the reason).

With the complete edge set (``complete_edges``: every pair of nodes with some component pair in the
depth order plus every node at a target position -> out) this reproduces node-level faithfulness (up to
float rounding; exact when no two explicit component nodes overlap, e.g. a0.0 and a0.0@=, and distinct
position names never share an index).  Metrics and normalisation are the evaluator's:
(m(edges) − m(∅)) / (m(M) − m(∅)) for LD and accuracy, 1 − KL(edges)/KL(∅) for KL.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from circuitkit.circuit.evaluate import (
    HEAD_KINDS,
    METRICS,
    MLP_KINDS,
    AblationEvaluator,
    as_sites,
    bundle_components,
    site_role,
)
from circuitkit.errors import CircuitkitError
from circuitkit.patching.path import read_depth
from circuitkit.results import to_jsonable
from circuitkit.sites import Site, check_site, parse_site
from circuitkit.types import OUTPUT_PREFIX, Edge, EdgeLike, Node

DEFINITIONS = (__doc__ or "").split("\n", 1)[1].strip()
OUT = OUTPUT_PREFIX


@dataclass
class _Node:
    name: str
    site: Site
    role: str  # head / mlp
    heads: list[int]
    read: int
    write: int
    rows: Tensor  # [n, pos] bool
    index: int


def _component_key(s: Site, n_heads: int) -> list[tuple]:
    """(head, L, H) / (mlp, L) identities of the components a component site holds."""
    if s.kind in MLP_KINDS:
        return [("mlp", s.layer)]
    heads = [s.head] if s.kind in HEAD_KINDS else list(range(n_heads))
    return [("head", s.layer, h) for h in heads]


def _component_node(ev: AblationEvaluator, s: Site, rows: Tensor, index: int, name: str | None = None) -> _Node:
    if s.kind in MLP_KINDS:
        read = read_depth(s, ev.pm.runner.arch.parallel)
        return _Node(name or str(s), s, "mlp", [], read, 2 * s.layer + 2, rows, index)
    heads = [s.head] if s.kind in HEAD_KINDS else list(range(ev.H))
    return _Node(name or str(s), s, "head", heads, 2 * s.layer, 2 * s.layer + 1, rows, index)


@dataclass
class _Expansion:
    nodes: list[_Node]  # component nodes (explicit + bundle components), de-duplicated
    of: dict[str, list[_Node]]  # circuit node name -> the component nodes that stand for it
    bundles: dict[str, list[str]]  # residual node -> names of the nodes that stand for its bundle
    never: list[str]


def _expand(ev: AblationEvaluator, sites: Sequence[Site]) -> _Expansion:
    """Component nodes of the circuit: explicit component nodes as they are, then every residual node's
    bundle components, each either an existing node that already holds it at those rows or a new node
    with the rows not yet held."""
    for s in sites:
        check_site(s, ev.L, ev.H)
    nodes: list[_Node] = []
    of: dict[str, list[_Node]] = {}
    held: dict[tuple, list[tuple[_Node, Tensor]]] = {}  # component identity -> (node, rows it holds)
    never: list[str] = []

    def hold(nd: _Node) -> None:
        for key in _component_key(nd.site, ev.H):
            held.setdefault(key, []).append((nd, nd.rows))

    for s in sites:
        role = site_role(s)
        if role == "never_ablated":
            never.append(str(s))
        elif role == "component" and str(s) not in of:
            nd = _component_node(ev, s, ev.rows(s.position), len(nodes))
            nodes.append(nd)
            of[nd.name] = [nd]
            hold(nd)
    bundles: dict[str, list[str]] = {}
    for s in sites:
        if site_role(s) != "residual" or str(s) in of:
            continue
        members: list[_Node] = []
        for c in bundle_components(s, ev.H):
            key = _component_key(c, ev.H)[0]
            rows = ev.rows(c.position)
            free = rows.clone()
            for nd, r in held.get(key, []):
                if bool((r & rows).any()):
                    if nd not in members:
                        members.append(nd)
                    free &= ~r
            if bool(free.any()):
                name = str(c) if str(c) not in {n.name for n in nodes} else f"{c}|{s}"
                nd = _component_node(ev, c, free, len(nodes), name)
                nodes.append(nd)
                members.append(nd)
                held.setdefault(key, []).append((nd, free))
        of[str(s)] = members
        bundles[str(s)] = [m.name for m in members]
    return _Expansion(nodes, of, bundles, never)


def _pairs(ss: Sequence[_Node], rs: Sequence[_Node]) -> list[tuple[_Node, _Node]]:
    return [(a, b) for a in ss for b in rs if a is not b and a.write <= b.read]


def _at_target(ev: AblationEvaluator, nd: _Node | Tensor, t: int) -> bool:
    rows = nd if isinstance(nd, Tensor) else nd.rows
    sel = ev.pair_target == t
    pi, pp = torch.as_tensor(ev.pair_input[sel]), ev._pair_pos[torch.as_tensor(sel)]
    return bool(rows[pi, pp].any())


def complete_edges(evaluator: AblationEvaluator, sites: Iterable[Site | str]) -> list[Edge]:
    """Every ordered pair of circuit nodes (s, r) of which some component pair is in the depth order
    (a component of s written at or before a component of r reads; a residual node's components are its
    bundle), plus every node at a target position (in some input, or position-less) -> ``out:T``.  With
    these edges edge-level faithfulness equals node-level faithfulness (module doc)."""
    ev = evaluator
    sites = as_sites(sites)
    ex = _expand(ev, sites)
    nodes = {str(s): Node.of(s) for s in sites}
    names = [str(s) for s in sites if str(s) in ex.of]
    edges = []
    for r in names:
        for s in names:
            if s != r and _pairs(ex.of[s], ex.of[r]):
                edges.append(Edge(nodes[s], nodes[r]))
    for t, name in enumerate(ev.target_names):
        for s in sites:
            if str(s) in ex.of and _at_target(ev, ev.rows(s.position), t):
                edges.append(Edge(nodes[str(s)], Node.output(name)))
    return edges


@dataclass
class EdgeFaithfulness:
    nodes: list[str]
    edges: list[list[str]]
    ignored_edges: list[list[str]]  # [sender, receiver, reason]
    n: int
    means: dict[str, dict[str, float]]  # metric -> target -> mean in the edge-restricted run
    normalized: dict[str, dict[str, float]]
    normalized_ci: dict[str, dict[str, list[float]]]
    faithfulness_normalized: dict[str, float]  # LD (primary)
    faithfulness_normalized_ci: dict[str, list[float]]
    expanded_nodes: dict[str, list[str]] = field(default_factory=dict)  # residual node -> its component nodes
    expanded_edges: list[list[str]] = field(default_factory=list)  # the component-level edges run
    definitions: str = field(default=DEFINITIONS)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def _name(x: str | Site | Node) -> str:
    """The canonical name of an edge's end: a site or ``out:T`` (a receiver input is not a circuit node)."""
    if isinstance(x, Node):
        if x.kind == "input":
            raise CircuitkitError(f"{x} is a receiver input, not a circuit node (a site or {OUT}TARGET)")
        return str(x)
    if isinstance(x, Site):
        return str(x)
    return x if x.startswith(OUT) else str(parse_site(x))


@dataclass
class _Plan:
    ex: _Expansion
    incoming: dict[str, list[_Node]]
    outgoing: dict[str, list[_Node]]
    used: list[list[str]]
    ignored: list[list[str]]
    expanded: list[list[str]]


def _skip(plan: _Plan, strict: bool, s: str, r: str, why: str) -> None:
    """Record an edge that cannot be run as ignored (with the reason), or raise on it when ``strict``."""
    if strict:
        raise CircuitkitError(f"edge {s} -> {r}: {why}")
    plan.ignored.append([s, r, why])


def _link(plan: _Plan, a: _Node, b: _Node) -> None:
    """Let component node ``b`` read ``a``'s delta (once), and list the component-level edge."""
    if a not in plan.incoming[b.name]:
        plan.incoming[b.name].append(a)
        plan.expanded.append([a.name, b.name])


def _plan_output_edge(ev: AblationEvaluator, plan: _Plan, s: str, r: str, strict: bool) -> None:
    """Plan an edge s -> out:T: every component of s writes into T's final residual stream."""
    t = r[len(OUT):]
    if t not in plan.outgoing:
        _skip(plan, strict, s, r, f"unknown target {t!r}; valid: {', '.join(ev.target_names)}")
        return
    for a in plan.ex.of[s]:
        if a not in plan.outgoing[t]:
            plan.outgoing[t].append(a)
            plan.expanded.append([a.name, r])
    plan.used.append([s, r])


def _plan_edge(ev: AblationEvaluator, plan: _Plan, s: str, r: str, strict: bool) -> None:
    """Plan one named edge s -> r (module doc), or skip it with the reason it carries nothing or is unknown."""
    ex = plan.ex
    if s in ex.never:
        _skip(plan, strict, s, r, "the sender is an embedding, never ablated (part of R0): the edge carries nothing")
    elif r in ex.never:
        _skip(plan, strict, s, r, "the receiver is an embedding node: it reads nothing")
    elif s not in ex.of:
        _skip(plan, strict, s, r, f"{s} is not a circuit node ({', '.join(ex.of) or 'none'})")
    elif r.startswith(OUT):
        _plan_output_edge(ev, plan, s, r, strict)
    elif r not in ex.of:
        _skip(plan, strict, s, r, f"{r} is not a circuit node ({', '.join(ex.of)})")
    else:
        pairs = _pairs(ex.of[s], ex.of[r])
        if not pairs:
            _skip(plan, strict, s, r, f"{s} is written after {r} reads the residual stream")
            return
        for a, b in pairs:
            _link(plan, a, b)
        plan.used.append([s, r])


def _plan(ev: AblationEvaluator, sites: Sequence[Site], edges: Iterable[EdgeLike], strict: bool) -> _Plan:
    ex = _expand(ev, sites)
    plan = _Plan(ex, incoming={n.name: [] for n in ex.nodes}, outgoing={t: [] for t in ev.target_names},
                 used=[], ignored=[], expanded=[])
    for edge in edges:
        s_raw, r_raw = (edge.sender, edge.receiver) if isinstance(edge, Edge) else edge
        try:
            s, r = _name(s_raw), _name(r_raw)
        except CircuitkitError as e:
            _skip(plan, strict, str(s_raw), str(r_raw), f"not a site ({e})")
            continue
        _plan_edge(ev, plan, s, r, strict)
    for r in ex.bundles:  # a bundle's complete internal edges
        for a, b in _pairs(ex.of[r], ex.of[r]):
            _link(plan, a, b)
    return plan


@torch.no_grad()
def _run(ev: AblationEvaluator, plan: _Plan) -> list[Tensor]:
    r_ = ev.pm.runner
    order = sorted(plan.ex.nodes, key=lambda n: (n.read, n.index))
    final = 2 * ev.L
    dev = ev.device
    chunks = []
    for sl in ev._batches():
        ids = ev.ids[sl].to(dev)
        delta: dict[str, Tensor] = {}
        for nd in order:
            rows = nd.rows[sl].to(dev)[..., None]
            x = ev.empty_resid(nd.read)[sl].clone()
            for s in plan.incoming[nd.name]:
                x = x + delta[s.name]
            L = nd.site.layer
            if nd.role == "head":
                hook = f"blocks.{L}.attn.hook_z"
                _, c = r_.run(ids, start_at_layer=L, stop_at_layer=L + 1, resid=x, cache=[hook], return_logits=False)
                dz = (c[hook] - ev.src_z[L][sl])[:, :, nd.heads]  # [b, pos, h, d_head]
                d = r_.head_out(L, dz, nd.heads)
            else:
                d = r_.mlp(L, r_.norm2(L, x)) - ev.src_mlp[L][sl]
            delta[nd.name] = d * rows
        ps = ev._pairs_of(sl)
        p_rows = torch.as_tensor(ev.pair_input[ps] - sl.start, device=dev)
        p_pos, p_tgt = ev._pair_pos[ps].to(dev), torch.as_tensor(ev.pair_target[ps], device=dev)
        pl = None
        groups: dict[tuple[str, ...], list[int]] = {}
        for t, name in enumerate(ev.target_names):
            groups.setdefault(tuple(sorted(s.name for s in plan.outgoing[name])), []).append(t)
        for key, ts in groups.items():
            resid = ev.empty_resid(final)[sl].clone()
            for s in key:
                resid = resid + delta[s]
            logits, _ = r_.run(ids, start_at_layer=ev.L, resid=resid)
            sel = torch.isin(p_tgt, torch.tensor(ts, device=dev))
            got = logits[p_rows[sel], p_pos[sel]]
            if pl is None:
                pl = torch.zeros(len(p_rows), got.shape[-1], dtype=got.dtype, device=dev)
            pl[sel] = got
        chunks.append(pl)
    return chunks


def edge_logits(evaluator: AblationEvaluator, sites: Iterable[Site | str], edges: Iterable[EdgeLike],
                strict: bool = False,
                ) -> tuple[list[Tensor], list[list[str]], list[list[str]]]:
    """Per batch, the pair logits of the edge-restricted circuit run (module doc); plus the edges
    used and the edges ignored ([sender, receiver, reason]; ``strict`` raises on an edge that is
    not between circuit nodes or has no component pair in the depth order, instead of ignoring it)."""
    plan = _plan(evaluator, as_sites(sites), edges, strict)
    return _run(evaluator, plan), plan.used, plan.ignored


def edge_faithfulness(evaluator: AblationEvaluator, sites: Iterable[Site | str], edges: Iterable[EdgeLike],
                      ci: bool = True, strict: bool = False) -> EdgeFaithfulness:
    """Faithfulness of the circuit whose nodes read from each other only along ``edges`` (module doc).

    sites: the circuit's nodes (residual nodes are expanded into their bundles' components); edges:
    ``types.Edge`` s or (sender, receiver) pairs of node names, sites or nodes, receiver a node or
    ``out:TARGET``."""
    ev = evaluator
    sites = as_sites(sites)
    plan = _plan(ev, sites, edges, strict)
    sc = ev.scores_from_pair_logits(_run(ev, plan))
    means = {m: ev.means(sc.metric(m)) for m in METRICS}
    normalized, normalized_ci = {}, {}
    for m in METRICS:
        normalized[m], normalized_ci[m] = ev.normalized(sc, m, ci=ci)
    return EdgeFaithfulness(nodes=[str(s) for s in sites], edges=plan.used, ignored_edges=plan.ignored, n=ev.n,
                            means=means, normalized=normalized, normalized_ci=normalized_ci,
                            faithfulness_normalized=normalized["logit_diff"],
                            faithfulness_normalized_ci=normalized_ci["logit_diff"],
                            expanded_nodes=plan.ex.bundles, expanded_edges=plan.expanded)


__all__ = ["EdgeFaithfulness", "complete_edges", "edge_faithfulness", "edge_logits", "DEFINITIONS"]
