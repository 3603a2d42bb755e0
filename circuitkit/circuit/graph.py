"""Circuit graph: verified nodes, edges found by path patching, outputs.

Nodes are verified (site@position, features); output nodes ``out:A1`` ... are the task's answers.
An edge sender → receiver exists when patching the sender from a source that differs in the
sender's feature, *along the receiver's input path only* (every other component between them
frozen at its base value), moves the answer the receiver is verified for; it is labelled with the
sender's feature.  Edges node → output come from verification (the answers the node is
necessary and sufficient for), unless a path edge to another node verified for the same answer
already explains the effect (then the answer is reached through that node).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from circuitkit.patching.path import path_patch_to_site, read_depth, write_depth
from circuitkit.sites import Site, parse_site
from circuitkit.verify.interchange import InterchangeVerifier
from circuitkit.verify.report import VerifiedNode
from circuitkit.verify.stats import estimate

def can_send(sender: Site, receiver: Site) -> bool:
    """Whether the sender's value can reach the receiver's input through the residual stream."""
    if sender == receiver:
        return False
    if sender.kind.startswith("resid") and receiver.kind.startswith("resid"):
        return write_depth(sender) < read_depth(receiver)
    return write_depth(sender) <= read_depth(receiver) and write_depth(sender) < write_depth(receiver)


@dataclass(frozen=True)
class EdgeResult:
    sender: str
    receiver: str
    feature: str
    target: str
    effect: float
    ci_low: float
    ci_high: float
    n: int


def edge_effects(verifier: InterchangeVerifier, sender: VerifiedNode, receiver: VerifiedNode,
                 n_pairs: int = 150) -> list[EdgeResult]:
    """Change rate of the receiver's answers when only the sender→receiver path carries a source
    that differs in the sender's (first) feature; one result per answer the receiver is verified for."""
    s_site, r_site = parse_site(sender.site), parse_site(receiver.site)
    feature = sender.features[0]
    codes = verifier.codes(s_site, feature)[None]
    rng = random.Random(zlib.crc32(f"{sender.site}->{receiver.site}".encode()))
    old = verifier.n_pairs
    verifier.n_pairs = n_pairs
    try:
        base, src = verifier._pairs(codes, agree=False, rng=rng)
    finally:
        verifier.n_pairs = old
    if base.size == 0:
        return []
    logits = path_patch_to_site(verifier.pm, verifier.ids[base], verifier.ids[src], s_site, r_site)
    pred = logits.argmax(-1).cpu()
    changes = verifier._changes(r_site, base, pred)
    out = []
    for t in receiver.targets:
        x = changes.get(t)
        if x is None or x.size == 0:
            continue
        e = estimate(x)
        out.append(EdgeResult(sender.site, receiver.site, feature, t, e.mean, e.ci_low, e.ci_high, e.n))
    return out


def build_circuit(verifier: InterchangeVerifier, nodes: Sequence[VerifiedNode], min_edge: float = 0.1,
                  n_pairs: int = 150) -> nx.DiGraph:
    """A DiGraph of verified nodes, path-patching edges between them, and output nodes.

    An edge sender → receiver is kept when the CI low of the receiver's answer change rate along
    that path alone is at least ``min_edge`` (stated in the graph's ``edge_rule`` attribute).
    """
    g = nx.DiGraph(task=verifier.task.name,
                   edge_rule=f"path-patching change rate CI low >= {min_edge} on an answer the receiver carries")
    example = verifier.tokens[0]
    for n in nodes:
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
            continue
        g.add_node(n.site, kind="site", site_kind=s.kind, layer=s.layer if s.layer is not None else -1,
                   head=s.head if s.head is not None else -1, position=str(s.position), index=pos,
                   depth=write_depth(s), features=list(n.features), targets=list(n.targets), effect=n.effect,
                   iia=n.iia if n.iia is not None else -1.0, joint=n.joint, group=", ".join(n.group))
    last = 2 * verifier.pm.n_layers + 1
    for site in [n for n in g.nodes if g.nodes[n]["kind"] == "site"]:
        d = g.nodes[site]
        for t in d["targets"]:
            out = f"out:{t}"
            if not g.has_node(out):
                tpos = next((x.position for ts in verifier.targets for x in ts if x.name == t), -1)
                g.add_node(out, kind="output", site_kind="output", layer=verifier.pm.n_layers, head=-1,
                           position=t, index=tpos, depth=last, features=[], targets=[t], effect=0.0, iia=-1.0,
                           joint=False, group="")
            g.add_edge(site, out, kind="output", feature=" + ".join(d["features"]), answer=t, effect=d["effect"],
                       ci_low=d["effect"], ci_high=d["effect"])
    site_nodes = [n for n in g.nodes if g.nodes[n]["kind"] == "site"]
    by_site = {n.site: n for n in nodes}
    for a in site_nodes:
        for b in site_nodes:
            sa, sb = parse_site(a), parse_site(b)
            if not can_send(sa, sb):
                continue
            ia, ib = g.nodes[a]["index"], g.nodes[b]["index"]
            if ia > ib >= 0:
                continue  # attention only reads earlier positions
            res = edge_effects(verifier, by_site[a], by_site[b], n_pairs)
            best = max(res, key=lambda r: r.ci_low, default=None)
            if best is not None and best.ci_low >= min_edge:
                g.add_edge(a, b, kind="path", feature=best.feature, answer=best.target, effect=round(best.effect, 4),
                           ci_low=round(best.ci_low, 4), ci_high=round(best.ci_high, 4))
    # a node -> answer edge is kept only when no path edge to another node carrying that answer explains it
    for a in site_nodes:
        for b in [b for b in g.successors(a) if g.edges[a, b]["kind"] == "output"]:
            t = g.edges[a, b]["answer"]
            if any(g.edges[a, r]["kind"] == "path" and t in g.nodes[r]["targets"] for r in g.successors(a)):
                g.remove_edge(a, b)
    return g


__all__ = ["read_depth", "write_depth", "can_send", "EdgeResult", "edge_effects",
           "build_circuit"]
