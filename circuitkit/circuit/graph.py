"""Circuit graph: its nodes, the edges path patching finds between them, and the answers.

Nodes are the final circuit's sites: verified (site@position, features) and the components that
circuit growth added without a verified feature (``explained = False``, labelled "unexplained").
Output nodes ``out:A1`` ... are the task's answers.

An edge sender → receiver is tested for every ordered pair that the residual stream allows
(the sender writes before the receiver reads, never from a later position), except *containment*
pairs, which hold by definition (a component and the residual stream at its own position that
already contains its output; two residual sites of one position).  The test is Wang et al.'s path
patching (``circuitkit.patching.path.path_patch_to_site``): the sender takes a source's value along
the path into the receiver only, everything else between them frozen at the base.

* An explained sender is patched from fair sources that differ in its feature, and — the agree-pair
  control — from fair sources that agree on it.  effect = change rate (differ) − change rate
  (agree) of the answers downstream of the receiver; IIA = share of differing pairs whose answer
  becomes what the sender's feature predicts.
* An unexplained sender is patched from aligned resample sources (same layout); effect = change rate.

A residual-stream receiver (``x1.mid@:``) is read through the components that write into it at its
position (its bundle, which run live), so an edge into it says the sender's information reaches
that point of the stream.

The edge is kept when its effect's CI low is at least ``min_edge`` and labelled with the sender's
feature.  Output edges (node → ``out:T``) are path patched the same way to the final residual
stream at the answer's position (the unembedding's input), for nodes written at that position.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import networkx as nx
import torch
from torch import Tensor

from circuitkit import shards
from circuitkit.patching.path import path_patch_to_site, read_depth, write_depth
from circuitkit.sites import Site, parse_site
from circuitkit.stats import Estimate, proportion, proportion_diff
from circuitkit.tasks.base import LAYOUT
from circuitkit.types import Edge, Node
from circuitkit.verification.interchange import InterchangeVerifier
from circuitkit.verification.report import VerifiedNode

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")


def _resid_depth(s: Site) -> int:
    """Depth of a residual-stream site's value: x{L}.pre 2L, x{L}.mid 2L+1, x{L}.post 2L+2."""
    return 2 * (s.layer or 0) + {"resid_pre": 0, "resid_mid": 1, "resid_post": 2}[s.kind]


def can_send(sender: Site, receiver: Site, parallel: bool = False) -> bool:
    """Whether the sender's value can reach the receiver's input through the residual stream (``parallel``:
    the model's blocks have a parallel residual, so a layer's MLP does not read its attention's output)."""
    if sender == receiver:
        return False
    if sender.kind in RESID_KINDS and receiver.kind in RESID_KINDS:
        return _resid_depth(sender) < _resid_depth(receiver)
    if receiver.kind in RESID_KINDS:
        return write_depth(sender) <= _resid_depth(receiver)
    if sender.kind in RESID_KINDS:
        return _resid_depth(sender) <= read_depth(receiver, parallel)
    return write_depth(sender) <= read_depth(receiver, parallel) and write_depth(sender) < write_depth(receiver)


def is_containment(sender: Site, receiver: Site, parallel: bool = False) -> bool:
    """The receiver is the residual stream at the sender's own position, which holds the sender's
    output (or an earlier residual value) by definition: a path-patching edge there means nothing."""
    return (receiver.kind in RESID_KINDS and sender.position == receiver.position
            and can_send(sender, receiver, parallel))


@dataclass(frozen=True)
class EdgeResult:
    """One path-patching test: sender → receiver, read on one answer."""

    sender: str
    receiver: str
    feature: str  # the sender's feature(s), " + "-joined, or "unexplained"
    target: str
    effect: float  # change(differ) − change(agree); for unexplained senders the change rate
    ci_low: float
    ci_high: float
    n: int
    change_agree: float | None  # the agree-pair control (explained senders)
    iia: float | None  # answer moved as the sender's feature predicts, along this path only
    iia_ci: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CircuitNode:
    """A node of the final circuit: a site, what it carries (if verified) and how it got in."""

    site: str
    features: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    iia: float | None = None
    effect: float = 0.0
    explained: bool = True  # False: added by circuit growth, no verified feature
    architectural: bool = False
    group: tuple[str, ...] = ()
    joint: bool = False
    structural: bool = False  # found by zero ablation where no same-layout source moves it (circuit/structural.py)

    @classmethod
    def from_verified(cls, n: VerifiedNode) -> CircuitNode:
        return cls(n.site, n.features, n.targets, n.iia, n.effect, True, n.architectural, n.group, n.joint)

    @classmethod
    def unexplained(cls, site: str) -> CircuitNode:
        return cls(site, explained=False)


def target_position_names(verifier: InterchangeVerifier) -> dict[str, str]:
    """{target: the named position where it is read} (the first input's naming)."""
    out: dict[str, str] = {}
    for toks, ts in zip(verifier.tokens, verifier.targets, strict=False):
        named = {i: n for n, i in verifier.task.positions(toks).items()}
        for t in ts:
            if t.name not in out and t.position in named:
                out[t.name] = named[t.position]
    return out


def aligned_resample_pairs(verifier: InterchangeVerifier, n: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """Bases of the search split and one aligned (same-layout) resample source each."""
    rows = list(verifier.split_rows["search"])
    rng.shuffle(rows)
    bases, srcs = [], []
    for i in rows:
        if len(bases) >= n:
            break
        got = verifier.task.fair_sources(verifier.inputs[i], rng, 1, (LAYOUT,))
        if got:
            bases.append(i)
            srcs.append(got[0])
    return bases, srcs


def where_both(verifier: InterchangeVerifier, bases: Sequence[int], sources: Sequence[str], *sites: Site
               ) -> tuple[list[int], list[str]]:
    """The (base row, source) pairs in which every site's position exists in both inputs."""
    pos = verifier.coder.position
    keep = [(b, src) for b, src in zip(bases, sources, strict=False)
            if all(pos(verifier.inputs[b], x.position) is not None and pos(src, x.position) is not None for x in sites)]
    return [b for b, _ in keep], [src for _, src in keep]


@torch.no_grad()
def _path_pred(verifier: InterchangeVerifier, bases: Sequence[int], sources: Sequence[str], sender: Site,
               receiver: Site, through_bundle: bool = True, receiver_inputs: Sequence[str] | None = None) -> Tensor:
    if not bases:
        return torch.zeros(0, verifier.ids.shape[1], dtype=torch.long)
    logits = path_patch_to_site(verifier.pm, verifier.ids[list(bases)], verifier.task.encode(list(sources)),
                                sender, receiver, through_bundle=through_bundle, receiver_inputs=receiver_inputs)
    return logits.argmax(-1).cpu()


def edge_effects(verifier: InterchangeVerifier, sender: CircuitNode | VerifiedNode, receiver_site: str,
                 answers: Sequence[str], n_pairs: int = 150,
                 receiver_inputs: Sequence[str] | None = None) -> list[EdgeResult]:
    """Path-patching results of sender → receiver on each of ``answers`` (see the module docstring).

    ``receiver_site`` may be a site or ``out:T`` (the final residual stream at T's position);
    ``receiver_inputs``: only these of a head receiver's query, key and value read the patched stream."""
    if isinstance(sender, VerifiedNode):
        sender = CircuitNode.from_verified(sender)
    s_site = parse_site(sender.site)
    if receiver_site.startswith("out:"):
        tname = receiver_site[4:]
        pos = target_position_names(verifier).get(tname)
        if pos is None:
            return []
        r_site = Site("resid_post", verifier.pm.n_layers - 1, position=pos)
    else:
        r_site = parse_site(receiver_site)
    rng = random.Random(zlib.crc32(f"{sender.site}->{receiver_site}|{verifier.seed}".encode()))
    feats = list(sender.features)
    if feats:
        db, ds, ab, as_ = verifier.fair_pairs(s_site, feats, "search", rng=rng, n_pairs=n_pairs)
    else:
        db, ds = aligned_resample_pairs(verifier, n_pairs, rng)
        ab, as_ = [], []
    # keep the pairs where both ends exist in base and source (e.g. A4 only with a 4-digit answer)
    db, ds = where_both(verifier, db, ds, s_site, r_site)
    ab, as_ = where_both(verifier, ab, as_, s_site, r_site)
    direct = receiver_site.startswith("out:")  # into the unembedding's input: the direct path only
    pred_d = _path_pred(verifier, db, ds, s_site, r_site, not direct, receiver_inputs)
    pred_a = _path_pred(verifier, ab, as_, s_site, r_site, not direct, receiver_inputs)
    ch_d, ch_a = verifier.changes(r_site, db, pred_d), verifier.changes(r_site, ab, pred_a)
    label = " + ".join(feats) if feats else "unexplained"
    out = []
    for t in answers:
        xd = ch_d.get(t)
        if xd is None or xd.size < 2:
            continue
        xa = ch_a.get(t)
        if feats and xa is not None and xa.size >= 2:
            e: Estimate = proportion_diff(xd, xa)
            agree = float(xa.mean())
        else:
            e, agree = proportion(xd), None
        iia = iia_ci = None
        am = verifier.answer_model(s_site, feats, t) if feats else None
        if am is not None:
            hits, _ = verifier.iia_hits(s_site, feats, am, db, ds, pred_d)
            if hits.size:
                ie = proportion(hits)
                iia, iia_ci = round(ie.mean, 4), (round(ie.ci_low, 4), round(ie.ci_high, 4))
        out.append(EdgeResult(sender.site, receiver_site, label, t, round(e.mean, 4), round(e.ci_low, 4),
                              round(e.ci_high, 4), e.n, None if agree is None else round(agree, 4), iia, iia_ci))
    return out


def answers_after(verifier: InterchangeVerifier, site: Site) -> list[str]:
    """Answers read at or after the site's position (on the inputs where it resolves; every answer in a
    bidirectional model)."""
    names: dict[str, None] = {}
    for toks, ts in zip(verifier.tokens[:200], verifier.targets[:200], strict=False):
        try:
            p = verifier.task.resolve_position(site.position, toks)
        except Exception:  # noqa: BLE001 - a position absent from this input
            continue
        for t in ts:
            if t.position >= p or not verifier.causal:
                names[t.name] = None
    return list(names)


def add_site_node(g: nx.DiGraph, n: CircuitNode, example: list[str], verifier: InterchangeVerifier) -> None:
    """Add a circuit node to the graph, or merge it into the node of its site (one site, several features)."""
    s = parse_site(n.site)
    try:
        pos = verifier.task.resolve_position(s.position, example)
    except Exception:  # noqa: BLE001 - display only
        pos = -1
    if g.has_node(n.site):  # one site verified with several features: merge
        d = g.nodes[n.site]
        d["features"] = list(dict.fromkeys(d["features"] + list(n.features)))
        d["targets"] = list(dict.fromkeys(d["targets"] + list(n.targets)))
        d["effect"] = max(d["effect"], n.effect)
        d["explained"] = d["explained"] or n.explained
        return
    g.add_node(n.site, kind="site", site_kind=s.kind, layer=s.layer if s.layer is not None else -1,
               head=s.head if s.head is not None else -1, position=str(s.position), index=pos,
               depth=_resid_depth(s) if s.kind in RESID_KINDS else write_depth(s),
               features=list(n.features) if n.features else ["unexplained"] * (not n.explained),
               targets=list(n.targets), effect=n.effect, iia=n.iia if n.iia is not None else -1.0,
               joint=n.joint, group=", ".join(n.group), explained=n.explained, architectural=n.architectural,
               structural=n.structural)


def _edge_candidates(g: nx.DiGraph, site_nodes: list[Node], tpos: dict[str, str], parallel: bool,
                     causal: bool = True) -> list[Edge]:
    """Edges to test: site pairs that can send and are not containment pairs (in position order for a causal model;
    a bidirectional one's attention reads later positions too), and each site into ``out:T`` for the answers read at
    its position."""
    sites = {a: a.site for a in site_nodes}
    pairs = []
    for a, sa in sites.items():
        for b, sb in sites.items():
            if not can_send(sa, sb, parallel) or is_containment(sa, sb, parallel):
                continue
            ia, ib = g.nodes[str(a)]["index"], g.nodes[str(b)]["index"]
            if ia > ib >= 0 and causal:
                continue  # causal attention only reads earlier positions
            pairs.append(Edge(a, b))
        for t, p in tpos.items():
            if str(sa.position) == p:
                pairs.append(Edge(a, Node.output(t)))
    return pairs


def _edge_answers(verifier: InterchangeVerifier, g: nx.DiGraph, b: Node) -> list[str]:
    """The answers an edge into ``b`` is judged on: an output's own, else the receiver's verified answers, else
    every answer read at or after it."""
    if b.is_output:
        return [b.answer]
    node_b = g.nodes[str(b)]
    return node_b["targets"] if node_b["explained"] and node_b["targets"] else answers_after(verifier, b.site)


def add_edge(g: nx.DiGraph, verifier: InterchangeVerifier, e: Edge, best: EdgeResult, last: int) -> None:
    """Add a kept edge a → b (with b's output node, made on first use) labelled by its best answer's result."""
    a, b = e.as_pair()
    if e.receiver.is_output and not g.has_node(b):
        t = e.receiver.answer
        g.add_node(b, kind="output", site_kind="output", layer=verifier.pm.n_layers, head=-1, position=t,
                   index=next((x.position for ts in verifier.targets for x in ts if x.name == t), -1),
                   depth=last, features=[], targets=[t], effect=0.0, iia=-1.0, joint=False, group="",
                   explained=True, architectural=False)
    g.add_edge(a, b, kind="output" if e.receiver.is_output else "path", feature=best.feature,
               answer=best.target, effect=best.effect, ci_low=best.ci_low, ci_high=best.ci_high,
               change_agree=-1.0 if best.change_agree is None else best.change_agree,
               iia=-1.0 if best.iia is None else best.iia, n=best.n)


def head_inputs(results: Sequence[Sequence[EdgeResult]], min_edge: float) -> str:
    """Which of a head's query, key and value carry an edge, from one result list per input (q, k, v): those
    whose best answer's CI low is at least ``min_edge``, ``+``-joined; ``q+k+v`` when none does alone (the edge
    needs them together)."""
    alone = [x for x, res in zip("qkv", results, strict=True)
             if max((r.ci_low for r in res), default=0.0) >= min_edge]
    return "+".join(alone) or "q+k+v"


def build_circuit(verifier: InterchangeVerifier, nodes: Sequence[CircuitNode | VerifiedNode], min_edge: float = 0.1,
                  n_pairs: int = 150, progress: bool = False, split_inputs: bool = False) -> nx.DiGraph:
    """A DiGraph of the circuit's nodes, path-patching edges between them, and output nodes; every
    tested edge (kept or not) is listed in the graph attribute ``edge_tests``.  Nodes are keyed by their canonical
    spelling (``types.Node``).  ``split_inputs``: a kept edge into a head is tested again through its query, key
    and value alone, and the edge records which carry it (``inputs``)."""
    cnodes = [CircuitNode.from_verified(n) if isinstance(n, VerifiedNode) else n for n in nodes]
    cnodes = [replace(n, site=str(Node.of(n.site))) for n in cnodes]
    g = nx.DiGraph(task=verifier.task.name,
                   edge_rule=f"path-patching effect CI low >= {min_edge} on an answer downstream of the receiver "
                             "(explained senders: change rate when the sender's feature differs minus when it agrees; "
                             "unexplained senders: change rate under aligned resampling); containment pairs not tested")
    example = verifier.tokens[0]
    for n in cnodes:
        add_site_node(g, n, example, verifier)
    by_site = {n.site: n for n in cnodes}
    site_nodes = [Node.of(a) for a in g.nodes]
    tpos = target_position_names(verifier)
    last = 2 * verifier.pm.n_layers + 1
    parallel = verifier.pm.runner.arch.parallel
    tests: list[dict] = []
    pairs = _edge_candidates(g, site_nodes, tpos, parallel, verifier.causal)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(shards.is_mine(k) for k in range(len(pairs))), desc="edges", unit="edge")

    def test(e: Edge) -> list[EdgeResult]:
        a, b = e.as_pair()
        res = edge_effects(verifier, by_site[a], b, _edge_answers(verifier, g, e.receiver), n_pairs)
        if bar is not None:
            bar.update(1)
        return res

    # independent tests, each seeded by its edge; under torch.distributed each runs on one rank
    for e, res in zip(pairs, shards.map_units(test, pairs), strict=True):
        tests += [r.to_dict() for r in res]
        best = max(res, key=lambda r: r.ci_low, default=None)
        if best is not None and best.ci_low >= min_edge:
            add_edge(g, verifier, e, best, last)
            a, b = e.as_pair()
            if split_inputs and not e.receiver.is_output and parse_site(b).kind == "head":
                per = [edge_effects(verifier, by_site[a], b, _edge_answers(verifier, g, e.receiver), n_pairs, (x,))
                       for x in "qkv"]
                tests += [{**r.to_dict(), "receiver_inputs": x} for x, rs in zip("qkv", per, strict=True) for r in rs]
                g.edges[a, b]["inputs"] = head_inputs(per, min_edge)
    if bar is not None:
        bar.close()
    g.graph["edge_tests"] = tests
    return g


def edge_list(g: nx.DiGraph) -> list[Edge]:
    """The graph's edges (path and output), for edge-level evaluation."""
    return [Edge.of(a, b) for a, b in g.edges]


__all__ = ["read_depth", "write_depth", "can_send", "is_containment", "EdgeResult", "CircuitNode", "edge_effects",
           "build_circuit", "head_inputs", "edge_list", "aligned_resample_pairs", "add_edge", "add_site_node", "answers_after",
           "target_position_names", "where_both"]
