"""The edge graph that circuit-discovery methods score: every sender → receiver-input edge of a model.

=============  ==========================  ==================  ===============================================
role           MIB name                    circuitkit name     what it is
=============  ==========================  ==================  ===============================================
sender         ``input``                   ``x0.pre``          the embeddings (tokens and positions)
sender         ``a{L}.h{H}``               ``a{L}.{H}``        head H of layer L's result (``attn.hook_result``)
sender         ``m{L}``                    ``m{L}``            layer L's MLP output
receiver       ``a{L}.h{H}<q|k|v>``        ``a{L}.{H}.q|k|v``  what head H reads into its query, key or value
receiver       ``m{L}``                    ``m{L}.in``         what layer L's MLP reads
receiver       ``logits``                  ``logits``          what the unembedding reads
=============  ==========================  ==================  ===============================================

An edge exists where the sender writes before the receiver reads (a layer's heads feed its MLP unless the
residual is parallel).  Positions are not split: an edge carries the sender's output at every position, as in
EAP-IG and the MIB circuit track (Mueller et al. 2025), whose JSON layout ``to_mib_json`` writes.  A circuit is a
boolean mask over the edges; ``top_edges`` keeps the k best-scored edges and ``prune`` then drops edges whose
sender nothing feeds or whose receiver feeds nothing, as MIB does.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.sites import Site
from circuitkit.types import Circuit, Edge, Node

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Sender:
    """One sender: its MIB name, its site, and the hook its output is read at."""

    name: str
    site: Site
    layer: int  # -1 for the embeddings

    @property
    def node(self) -> Node:
        return Node.of(self.site)


@dataclass(frozen=True)
class Receiver:
    """One receiver input: its MIB name, circuitkit spelling, kind (head / mlp / logits), layer, head, q/k/v."""

    name: str
    spelling: str
    kind: str
    layer: int  # n_layers for the logits
    head: int | None = None
    qkv: str | None = None

    @property
    def node(self) -> Node:
        return Node("input", self.spelling)


class EdgeGraph:
    """Senders, receivers and which sender feeds which receiver, for a model of ``n_layers`` × ``n_heads``.

    ``real`` [n_senders, n_receivers] bool marks the edges that exist; scores and circuits are tensors of that
    shape (an edge that does not exist is never kept)."""

    def __init__(self, n_layers: int, n_heads: int, parallel: bool = False) -> None:
        if n_layers < 1 or n_heads < 1:
            raise CircuitkitError(f"an edge graph needs at least one layer and one head; got {n_layers} x {n_heads}")
        self.n_layers, self.n_heads, self.parallel = n_layers, n_heads, parallel
        self.senders: list[Sender] = [Sender("input", Site("resid_pre", 0), -1)]
        self.receivers: list[Receiver] = []
        for L in range(n_layers):
            self.receivers += [Receiver(f"a{L}.h{h}<{x}>", f"a{L}.{h}.{x}", "head", L, h, x)
                               for x in QKV for h in range(n_heads)]
            self.receivers.append(Receiver(f"m{L}", f"m{L}.in", "mlp", L))
            self.senders += [Sender(f"a{L}.h{h}", Site("head", L, h), L) for h in range(n_heads)]
            self.senders.append(Sender(f"m{L}", Site("mlp_out", L), L))
        self.receivers.append(Receiver("logits", "logits", "logits", n_layers))
        self.real = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        for j, r in enumerate(self.receivers):
            for i, s in enumerate(self.senders):
                self.real[i, j] = self.feeds(s, r)
        self.sender_index = {s.name: i for i, s in enumerate(self.senders)}
        self.receiver_index = {r.name: j for j, r in enumerate(self.receivers)}

    @classmethod
    def of_model(cls, runner: Any) -> EdgeGraph:
        """The edge graph of a ``ModelRunner`` (grouped-query attention is refused: its k and v are shared)."""
        if runner.n_kv_heads != runner.n_heads:
            raise CircuitkitError(f"circuit discovery needs one key/value head per head; this model shares "
                                  f"{runner.n_heads} heads over {runner.n_kv_heads} key/value heads")
        return cls(runner.n_layers, runner.n_heads, bool(runner.arch.parallel))

    def feeds(self, s: Sender, r: Receiver) -> bool:
        """Does sender ``s`` write before receiver ``r`` reads?"""
        if s.layer < r.layer or r.kind == "logits":
            return True
        return s.layer == r.layer and r.kind == "mlp" and s.site.kind == "head" and not self.parallel

    # ---- sizes and names ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return len(self.senders), len(self.receivers)

    @property
    def n_edges(self) -> int:
        return int(self.real.sum())

    def edge_names(self) -> list[str]:
        """MIB names (``a0.h1->a1.h2<q>``) of the real edges, in sender-major order."""
        return [f"{self.senders[i].name}->{self.receivers[j].name}" for i, j in self.real.nonzero().tolist()]

    def edge_index(self, name: str) -> tuple[int, int]:
        """(sender, receiver) index of an edge given by its MIB name."""
        s, sep, r = name.partition("->")
        if not sep or s not in self.sender_index or r not in self.receiver_index:
            raise CircuitkitError(f"unknown edge {name!r}; edges are spelled SENDER->RECEIVER, e.g. "
                                  f"'input->a0.h0<q>' or 'a0.h1->logits'")
        i, j = self.sender_index[s], self.receiver_index[r]
        if not self.real[i, j]:
            raise CircuitkitError(f"edge {name!r} does not exist: {s} writes after {r} reads")
        return i, j

    def full(self) -> Tensor:
        """The whole model as a circuit: every real edge kept [n_senders, n_receivers]."""
        return self.real.clone()

    def empty(self) -> Tensor:
        return torch.zeros_like(self.real)

    def check_mask(self, keep: Tensor) -> Tensor:
        """``keep`` as a bool mask of this graph's shape (extra dims in front allowed), without unreal edges."""
        if tuple(keep.shape[-2:]) != self.shape:
            raise CircuitkitError(f"an edge mask of shape {tuple(keep.shape)} does not fit the graph's "
                                  f"{self.shape} (senders x receivers)")
        return keep.bool() & self.real

    # ---- choosing circuits from scores ----------------------------------------------------------------------
    def top_edges(self, scores: Tensor, k: int, absolute: bool = False, prune: bool = True) -> Tensor:
        """The circuit of the ``k`` best-scored real edges (by signed score, or |score|), pruned like MIB's."""
        if not 0 <= k <= self.n_edges:
            raise CircuitkitError(f"cannot keep {k} edges of a graph with {self.n_edges}")
        s = (scores.abs() if absolute else scores).float().masked_fill(~self.real, float("-inf"))
        order = torch.argsort(s.flatten(), descending=True, stable=True)
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        keep = keep.view(self.shape) & self.real
        return self.prune(keep) if prune else keep

    def prune(self, keep: Tensor) -> Tensor:
        """Drop, until nothing changes, edges from a sender that no kept edge feeds (the input always counts as
        fed) and edges into a receiver whose component sends along no kept edge (the logits always count)."""
        keep = self.check_mask(keep).clone()
        owner = self.receiver_owner()  # [n_receivers] sender index of the receiver's component, -1 for logits
        while True:
            fed = torch.zeros(len(self.senders), dtype=torch.bool)
            fed[0] = True
            into = keep.any(0)  # [n_receivers]
            for j in into.nonzero().flatten().tolist():
                if owner[j] >= 0:
                    fed[owner[j]] = True
            sends = keep.any(1)  # [n_senders]
            alive_r = torch.tensor([o < 0 or bool(sends[o]) for o in owner.tolist()])
            new = keep & fed[:, None] & alive_r[None, :]
            if torch.equal(new, keep):
                return keep
            keep = new

    def receiver_owner(self) -> Tensor:
        idx = {(s.layer, s.site.kind, s.site.head): i for i, s in enumerate(self.senders)}
        out = []
        for r in self.receivers:
            if r.kind == "logits":
                out.append(-1)
            else:
                out.append(idx[(r.layer, "head" if r.kind == "head" else "mlp_out", r.head)])
        return torch.tensor(out)

    # ---- export ---------------------------------------------------------------------------------------------
    def to_mib_json(self, scores: Tensor, keep: Tensor, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """MIB circuit-track JSON: cfg, ``nodes`` {name: {in_graph}}, ``edges`` {name: {score, in_graph}}."""
        keep = self.check_mask(keep)
        nodes_in = keep.any(1).clone()
        nodes_in[0] = True
        nodes = {s.name: {"in_graph": bool(nodes_in[i])} for i, s in enumerate(self.senders)}
        nodes["logits"] = {"in_graph": True}
        edges = {f"{self.senders[i].name}->{self.receivers[j].name}":
                 {"score": float(scores[i, j]), "in_graph": bool(keep[i, j])} for i, j in self.real.nonzero().tolist()}
        cfg = {"n_layers": self.n_layers, "n_heads": self.n_heads, "parallel_attn_mlp": self.parallel}
        return {"cfg": cfg, "nodes": nodes, "edges": edges, **dict(extra or {})}

    def from_mib_json(self, d: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(scores, keep) from MIB JSON written for a model of this graph's shape."""
        cfg = d.get("cfg", {}) if isinstance(d, Mapping) else {}
        if (cfg.get("n_layers"), cfg.get("n_heads")) != (self.n_layers, self.n_heads):
            raise CircuitkitError(f"the circuit was found on a {cfg.get('n_layers')}-layer, {cfg.get('n_heads')}-head "
                                  f"model; this one has {self.n_layers} x {self.n_heads}")
        if not isinstance(d.get("edges"), Mapping):
            raise CircuitkitError("a MIB circuit JSON needs an 'edges' object {name: {score, in_graph}}")
        scores = torch.zeros(self.shape)
        keep = self.empty()
        for name, e in d["edges"].items():
            i, j = self.edge_index(name)
            scores[i, j] = float(e.get("score", 0.0))
            keep[i, j] = bool(e.get("in_graph", False))
        return scores, keep

    def to_circuit(self, keep: Tensor, scores: Tensor | None = None, attrs: Mapping[str, Any] | None = None) -> Circuit:
        """The kept edges as a ``types.Circuit`` (sender sites → receiver inputs), scores as edge attributes."""
        keep = self.check_mask(keep)
        edges: list[Edge] = []
        edge_attrs: dict[Edge, dict[str, float]] = {}
        for i, j in keep.nonzero().tolist():
            e = Edge(self.senders[i].node, self.receivers[j].node)
            edges.append(e)
            if scores is not None:
                edge_attrs[e] = {"score": float(scores[i, j])}
        nodes = list(dict.fromkeys([n for e in edges for n in (e.sender, e.receiver)]))
        return Circuit(tuple(nodes), tuple(edges), dict(attrs or {}), {}, edge_attrs)


def edge_count(graph: EdgeGraph, percent: float) -> int:
    """The number of edges MIB keeps at ``percent`` % of the graph (rounded, at least 1 above 0 %)."""
    if percent <= 0:
        return 0
    return min(graph.n_edges, max(1, round(graph.n_edges * percent / 100)))


def masks_for(graph: EdgeGraph, scores: Tensor, counts: Sequence[int], absolute: bool) -> Tensor:
    """One pruned top-k circuit per count: [len(counts), n_senders, n_receivers]."""
    return torch.stack([graph.top_edges(scores, k, absolute=absolute) for k in counts])


__all__ = ["EdgeGraph", "Receiver", "Sender", "QKV", "edge_count", "masks_for"]
