"""The inputs a discovery run scores on, and the circuits it is compared with that no method scored.

* ``build_problem``: ``n`` test-split bases, each with one aligned source, and the ablated sender outputs: the
  source's (``resample``), their mean over the sources at each position (``mean``) or zero (``zero``).
  Sources (``SOURCES``): ``same-layout`` (``task.fair_sources`` holding the layout, as circuit evaluation draws
  them) or ``any-layout``: any other input whose named positions sit where the base's do (a tracr input of another
  length: ``BOS x1 .. xn`` is a prefix of a longer one's).  Only the second moves what a layout fixes, such as
  tracr-reverse's length sub-circuit; a task whose layouts never agree on the positions they share (counting's
  query moves with the string's length) has no such source and is refused.
* ``circuit_edges``: circuitkit's own circuit (``circuit.json``) as edges of the edge graph: the heads and MLPs
  among its nodes (at any position: the graph does not split positions), every graph edge between two of them,
  from the embeddings into them and from them into the logits.  Residual nodes are the stream those edges run
  through and add no component; with ``bundles`` a residual node adds every head and MLP written into the
  stream before it (its bundle), at every position, which keeps almost every edge of a small model.
  An edge's score is the largest path-patching effect measured between the nodes it joins (0 where none was).
  A circuit built with ``[circuit] split_inputs`` (its edges into heads say which of query, key and value carry
  them) keeps only the graph edges its own edges name (``_edge_resolved``).
* ``moving_edges``: the edges the problem's ablation moves at all: the receiver's read of the sender's ablated
  output differs from its read of the clean one on some base (exact in a model without normalisation, whose
  reads are linear).  Ground truth outside it is invisible to the ablation, whatever the method.
* ``truth_mask``: a tracr model's ground truth (``ground_truth.json``) as edges: A → B's q / k / v where that
  input of B reads a variable A writes.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from circuitkit.circuit.evaluate import covered_components, site_role
from circuitkit.discovery.edge_graph import QKV, EdgeGraph, Receiver
from circuitkit.discovery.masked import ablated_outputs
from circuitkit.discovery.methods import DiscoveryProblem
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.runner import ModelRunner
from circuitkit.patching.metrics import metric_context
from circuitkit.sites import Site, parse_site
from circuitkit.tasks.base import Task

ABLATIONS = ("resample", "mean", "zero")
#: where resample sources come from: the base's own layout, or any layout whose named positions line up with it
SOURCES = ("same-layout", "any-layout")
#: draws per base when a source of another layout is sought
ANY_LAYOUT_TRIES = 200


def positions_line_up(task: Task, base: str, source: str) -> bool:
    """Whether every named position both inputs have sits at the same index in both, the default target's
    included (so a component's output at index i of the source stands for the same position in the base)."""
    pb, ps = task.positions(task.tokens(base)), task.positions(task.tokens(source))
    if any(pb[k] != ps[k] for k in pb.keys() & ps.keys()):
        return False
    try:
        tb, ts = task.target(task.tokens(base)), task.target(task.tokens(source))
    except (CircuitkitError, ValueError, IndexError):
        return False
    return tb.position == ts.position


def _other_layout_source(task: Task, base: str, rng: random.Random) -> str | None:
    """One input of another layout whose positions line up with ``base``'s (None when none is drawn)."""
    own = task.layout(task.tokens(base))
    for _ in range(ANY_LAYOUT_TRIES):
        cand = task.generate(rng, 1)[0]
        if cand != base and task.layout(task.tokens(cand)) != own and positions_line_up(task, base, cand):
            return cand
    return None


def aligned_pairs(pm: ProbedModel, n: int, seed: int, sources: str = "same-layout"
                  ) -> tuple[list[str], list[str]]:
    """Up to ``n`` test-split bases with one source each, drawn as ``sources`` says (bases that admit none are
    skipped)."""
    if sources not in SOURCES:
        raise CircuitkitError(f"unknown sources {sources!r}; valid: {', '.join(SOURCES)}")
    task, rng = pm.task, random.Random(seed)
    test = list(task.split("test"))
    bases, drawn = [], []
    for base in rng.sample(test, min(len(test), 20 * n)):
        if sources == "same-layout":
            src = next(iter(task.fair_sources(base, rng, 1, hold=("layout",))), None)
        else:
            src = _other_layout_source(task, base, rng)
        if src is not None:
            bases.append(base)
            drawn.append(src)
        if len(bases) == n:
            break
    if not bases:
        if sources == "any-layout":
            raise CircuitkitError(f"no test input of task {task.name!r} has an input of another layout whose named "
                                  "positions sit at the same indices; use --sources same-layout")
        raise CircuitkitError(f"no test input of task {task.name!r} has another input of the same layout to "
                              "ablate from; use --ablation zero or mean")
    return bases, drawn


def build_problem(pm: ProbedModel, n: int = 100, seed: int = 0, ablation: str = "resample",
                  metric: str = "logit_diff", sources: str = "same-layout"
                  ) -> tuple[DiscoveryProblem, dict[str, Any]]:
    """The problem every method scores on, and a record of how it was drawn."""
    if ablation not in ABLATIONS:
        raise CircuitkitError(f"unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}")
    graph = EdgeGraph.of_model(pm.runner)
    bases, srcs = aligned_pairs(pm, n, seed, sources)
    base_ids, src_ids = pm.task.encode(bases).to(pm.device), pm.task.encode(srcs).to(pm.device)
    abl = ablated_outputs(pm.runner, graph, src_ids)  # [S, b, pos, d]
    if ablation == "mean":
        abl = abl.mean(1, keepdim=True).expand_as(abl).contiguous()
    elif ablation == "zero":
        abl = torch.zeros_like(abl)
    ctx = metric_context(pm.task, base_ids.cpu(), src_ids.cpu()).to(pm.device)
    record = {"n": len(bases), "seed": seed, "ablation": ablation, "metric": metric, "source_layout": sources,
              "sources": "task.fair_sources(base, hold=('layout',)): same layout, another input"
              if sources == "same-layout" else "another layout whose named positions sit where the base's do",
              "examples": [{"base": b, "source": s} for b, s in list(zip(bases, srcs))[:5]]}
    return DiscoveryProblem(pm.runner, graph, base_ids, abl, ctx, metric), record


def _component(graph: EdgeGraph, site: Site) -> str | None:
    """The sender name of a component site (a head or an MLP, any position); None for anything else."""
    if site.kind == "head":
        return f"a{site.layer}.h{site.head}"
    if site.kind == "mlp_out":
        return f"m{site.layer}"
    return None


def _components_of(graph: EdgeGraph, node: str, bundles: bool = False) -> set[str]:
    site = parse_site(node)
    role = site_role(site)
    if role == "never_ablated":
        return {"input"}
    if role == "residual":
        return {_component(graph, s) for s in covered_components(site, graph.n_heads)} - {None} if bundles else set()
    name = _component(graph, site)
    if name is None:
        raise CircuitkitError(f"circuit node {node!r} is neither a head, an MLP, a residual site nor an embedding; "
                              "the edge graph has no node for it")
    return {name}


def circuit_edges(graph: EdgeGraph, circuit: Mapping[str, Any], bundles: bool = False) -> tuple[Tensor, Tensor]:
    """(keep, scores) [S, R] of circuitkit's circuit (``circuit.json``'s nodes and edges)."""
    nodes = [n["id"] for n in circuit.get("nodes", []) if n.get("kind", "site") == "site"]
    if not nodes:
        raise CircuitkitError("the circuit JSON lists no site nodes; pass a circuitkit circuit.json")
    comps: set[str] = {"input"}
    for node in nodes:
        comps |= _components_of(graph, node, bundles)
    inside = torch.tensor([s.name in comps for s in graph.senders])
    owner = graph.receiver_owner()
    recv_in = torch.tensor([o < 0 or bool(inside[o]) for o in owner.tolist()])
    keep = graph.real & inside[:, None] & recv_in[None, :]
    scores = torch.zeros(graph.shape)
    for e in circuit.get("edges", []):
        src, dst = e.get("source", ""), e.get("target", "")
        if src not in nodes or (dst not in nodes and not str(dst).startswith("out:")):
            continue
        senders = _components_of(graph, src, bundles)
        receivers = {"logits"} if str(dst).startswith("out:") else _components_of(graph, dst, bundles)
        for i, s in enumerate(graph.senders):
            for j in range(len(graph.receivers)):
                owner_name = "logits" if owner[j] < 0 else graph.senders[int(owner[j])].name
                if keep[i, j] and s.name in senders and owner_name in receivers:
                    scores[i, j] = max(float(scores[i, j]), abs(float(e.get("effect", 0.0))))
    if not bundles and any("inputs" in e for e in circuit.get("edges", [])):
        keep = _edge_resolved(graph, circuit, nodes) & keep
        scores = scores * keep
    return keep, scores


def _edge_resolved(graph: EdgeGraph, circuit: Mapping[str, Any], nodes: Sequence[str]) -> Tensor:
    """[S, R] bool: the graph edges circuitkit's own edges name, for a circuit whose edges into heads record which
    inputs carry them (``[circuit] split_inputs``): sender component → the receiver's recorded query / key /
    value, MLP input or the logits.  Edges to or from residual nodes name no component and add nothing."""
    keep = graph.empty()
    for e in circuit.get("edges", []):
        src, dst = e.get("source", ""), str(e.get("target", ""))
        if src not in nodes or (dst not in nodes and not dst.startswith("out:")):
            continue
        senders = _components_of(graph, src)
        if dst.startswith("out:"):
            names = {"logits"}
        else:
            site = parse_site(dst)
            if site.kind == "head":
                names = {f"a{site.layer}.h{site.head}<{x}>" for x in str(e.get("inputs", "q+k+v")).split("+")}
            elif site.kind == "mlp_out":
                names = {f"m{site.layer}"}
            else:
                continue
        for s in senders:
            i = graph.sender_index[s]
            for name in names:
                keep[i, graph.receiver_index[name]] = True
    return keep & graph.real


#: largest change of a receiver's read still counted as "no change" (float noise of the ablated forward)
UNMOVED = 1e-5


def _read_matrix(runner: ModelRunner, receiver: Receiver) -> Tensor:
    """What a receiver input reads of the residual stream, linearly: [d_model, d_read]."""
    if receiver.kind == "logits":
        return runner.W_U.T
    block = runner.layers[receiver.layer]
    if receiver.kind == "mlp":
        return block.W_in
    w = {"q": block.W_Q, "k": block.W_K, "v": block.W_V}[receiver.qkv]  # [heads or kv heads, d_model, d_head]
    return w[receiver.head * w.shape[0] // block.W_Q.shape[0]]


@torch.no_grad()
def moving_edges(p: DiscoveryProblem) -> Tensor | None:
    """[S, R] bool: the real edges whose receiver reads a different value when the sender's output is ablated,
    on some base and position (``UNMOVED``); None for a model with normalisation, whose reads are not linear."""
    if p.runner.arch.norm != "none":
        return None
    delta = p.clean_outputs() - p.ablated  # [S, b, pos, d_model]
    out = p.graph.empty()
    for j, rec in enumerate(p.graph.receivers):
        read = _read_matrix(p.runner, rec)
        for i in p.graph.real[:, j].nonzero().flatten().tolist():
            out[i, j] = bool((delta[i] @ read).abs().max() > UNMOVED)
    return out


def truth_mask(graph: EdgeGraph, truth: Mapping[str, Any]) -> Tensor:
    """The ground truth's edges [S, R] (``from_tracr.ground_truth``: components, edges with their variables)."""
    comps, keep = truth.get("components", {}), graph.empty()

    def sender(name: str) -> str:
        if name == "emb":
            return "input"
        kind, _, rest = name.partition(".")
        return f"{kind}.h{rest}" if name.startswith("a") else name

    for e in truth.get("edges", []):
        s, r, variables = sender(e["sender"]), e["receiver"], set(e.get("variables", []))
        i = graph.sender_index.get(s)
        if i is None:
            raise CircuitkitError(f"ground-truth sender {e['sender']!r} is not in the model's edge graph")
        if r == "out":
            keep[i, graph.receiver_index["logits"]] = True
        elif r.startswith("a"):
            L, H = (int(x) for x in r[1:].split("."))
            reads = comps.get(r, {}).get("reads_by_input", {})
            for x in QKV:
                if variables & set(reads.get(x, [])):
                    keep[i, graph.receiver_index[f"a{L}.h{H}<{x}>"]] = True
        else:
            keep[i, graph.receiver_index[r]] = True
    return keep & graph.real


__all__ = ["ABLATIONS", "SOURCES", "UNMOVED", "aligned_pairs", "build_problem", "circuit_edges", "moving_edges",
           "positions_line_up", "truth_mask"]
