"""The circuit's vocabulary: its nodes, its edges and the circuit they make, each with one canonical spelling.

=========  ===========================  ==========================================================================
node kind  spelling                     what it is
=========  ===========================  ==========================================================================
site       ``a1.0@:`` ``x0.pre@2``      a site at a position (or at every position), paper notation (``sites.py``)
output     ``out:A1``                   answer A1's logits, read at the answer's position
input      ``a1.0.q`` ``a1.kv0.k``      what one receiver reads from the residual stream (attribution patching's
           ``m1.in`` ``logits``         receivers): a head's q, k or v (a shared key/value head's k or v), an MLP's
                                        input, the unembedding's input
=========  ===========================  ==========================================================================

``str(node)`` is the spelling the graphs and JSON files use, so files written through these types stay
byte-identical.  A ``Circuit`` is the structural part (equal and hashed as its sets of nodes and edges); the
graph's, nodes' and edges' attribute dicts ride beside it, in insertion order and outside the hash.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from circuitkit.errors import CircuitkitError
from circuitkit.sites import Site, parse_site

#: the kinds of node (see the module table)
NODE_KINDS = ("site", "output", "input")
#: the prefix of an answer output's spelling
OUTPUT_PREFIX = "out:"
_INPUT_RE = re.compile(r"^(?:a\d+\.(?:\d+\.[qkv]|kv\d+\.[kv])|m\d+\.in|logits)$")
INPUT_HELP = "a{L}.{H}.q|k|v, a{L}.kv{G}.k|v, m{L}.in or logits"


@dataclass(frozen=True, order=True)
class Node:
    """One circuit node: ``kind`` (site / output / input) and its canonical spelling ``name``."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise CircuitkitError(f"unknown node kind {self.kind!r}; valid: {', '.join(NODE_KINDS)}")
        if self.kind == "site":
            canonical = str(parse_site(self.name))
            if canonical != self.name:
                raise CircuitkitError(f"site node {self.name!r} is not in canonical spelling; write {canonical!r} "
                                      "(or build it with Node.of)")
        elif self.kind == "output":
            if not self.name.startswith(OUTPUT_PREFIX) or not self.name[len(OUTPUT_PREFIX):].strip():
                raise CircuitkitError(f"output node {self.name!r} must be spelled {OUTPUT_PREFIX}ANSWER, e.g. "
                                      f"{OUTPUT_PREFIX}A1")
        elif not _INPUT_RE.match(self.name):
            raise CircuitkitError(f"receiver input {self.name!r} is not one of {INPUT_HELP}")

    @classmethod
    def of(cls, x: str | Site | Node) -> Node:
        """The node a site, a spelling (``a1.0@:``, ``out:A1``, ``m1.in``; either site notation) or a node names."""
        if isinstance(x, Node):
            return x
        if isinstance(x, Site):
            return cls("site", str(x))
        if not isinstance(x, str):
            raise CircuitkitError(f"a node is given as a str, Site or Node, not {type(x).__name__} ({x!r})")
        if x.startswith(OUTPUT_PREFIX):
            return cls.output(x[len(OUTPUT_PREFIX):])
        if _INPUT_RE.match(x):
            return cls("input", x)
        try:
            return cls("site", str(parse_site(x)))
        except CircuitkitError as e:
            raise CircuitkitError(f"cannot read node {x!r} ({e}); the other nodes are {OUTPUT_PREFIX}ANSWER and "
                                  f"receiver inputs ({INPUT_HELP})") from None

    @classmethod
    def output(cls, answer: str) -> Node:
        """The output node of answer ``answer`` (``out:A1``)."""
        if not isinstance(answer, str) or not answer.strip() or answer != answer.strip():
            raise CircuitkitError(f"an output node needs an answer name without surrounding spaces, e.g. 'A1'; "
                                  f"got {answer!r}")
        return cls("output", OUTPUT_PREFIX + answer)

    @property
    def site(self) -> Site | None:
        """The site of a site node; None for outputs and receiver inputs."""
        return parse_site(self.name) if self.kind == "site" else None

    @property
    def is_output(self) -> bool:
        return self.kind == "output"

    @property
    def answer(self) -> str | None:
        """The answer an output node reads (``A1`` for ``out:A1``); None for other nodes."""
        return self.name[len(OUTPUT_PREFIX):] if self.is_output else None

    def __str__(self) -> str:
        return self.name


NodeLike = str | Site | Node


@dataclass(frozen=True, order=True)
class Edge:
    """sender -> receiver: the sender's output reaches what the receiver reads.  Senders are sites."""

    sender: Node
    receiver: Node

    def __post_init__(self) -> None:
        for role, x in (("sender", self.sender), ("receiver", self.receiver)):
            if not isinstance(x, Node):
                raise CircuitkitError(f"edge {role} {x!r} is a {type(x).__name__}, not a Node (use Edge.of)")
        if self.sender.kind != "site":
            raise CircuitkitError(f"edge {self.sender} -> {self.receiver}: the sender is an {self.sender.kind} "
                                  "node, which sends nothing; a sender is a site")

    @classmethod
    def of(cls, sender: NodeLike, receiver: NodeLike) -> Edge:
        """The edge between two nodes given as spellings, sites or nodes."""
        return cls(Node.of(sender), Node.of(receiver))

    def as_pair(self) -> tuple[str, str]:
        """(sender, receiver) spellings, the old tuple form."""
        return str(self.sender), str(self.receiver)

    def __str__(self) -> str:
        return f"{self.sender} -> {self.receiver}"


EdgeLike = Edge | tuple[NodeLike, NodeLike]


@dataclass(frozen=True, eq=False)
class Circuit:
    """Nodes and edges in insertion order, plus attribute dicts (graph, per node, per edge) that export keeps.

    Equality and hash are the node and edge sets only; every edge's ends must be nodes of the circuit."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    node_attrs: Mapping[Node, Mapping[str, Any]] = field(default_factory=dict)
    edge_attrs: Mapping[Edge, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "edges", tuple(self.edges))
        _check_unique("node", self.nodes)
        _check_unique("edge", self.edges)
        known = set(self.nodes)
        for e in self.edges:
            missing = [str(x) for x in (e.sender, e.receiver) if x not in known]
            if missing:
                raise CircuitkitError(f"edge {e} ends at {', '.join(missing)}, not a node of the circuit")
        stray = [str(k) for k in self.node_attrs if k not in known]
        stray += [str(k) for k in self.edge_attrs if k not in set(self.edges)]
        if stray:
            raise CircuitkitError(f"attributes given for {', '.join(stray)}, not in the circuit")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return set(self.nodes) == set(other.nodes) and set(self.edges) == set(other.edges)

    def __hash__(self) -> int:
        return hash((frozenset(self.nodes), frozenset(self.edges)))

    # ---- node-link JSON (circuit.json's "graph", "nodes" and "edges") -----------------------------------------
    def to_json(self) -> dict[str, Any]:
        """{"graph": attrs, "nodes": [{"id", ...attrs}], "edges": [{"source", "target", ...attrs}]}."""
        return {"graph": dict(self.attrs),
                "nodes": [{"id": str(n), **self.node_attrs.get(n, {})} for n in self.nodes],
                "edges": [{"source": str(e.sender), "target": str(e.receiver), **self.edge_attrs.get(e, {})}
                          for e in self.edges]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Circuit:
        """The circuit of a node-link dict (``to_json``'s shape; other keys, e.g. the evaluation, are ignored)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("nodes"), list) or not isinstance(d.get("edges"), list):
            keys = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise CircuitkitError(f"a circuit JSON needs 'nodes' and 'edges' lists (node-link form); got {keys}")
        nodes, edges = [], []
        for i, n in enumerate(d["nodes"]):
            n = dict(n)
            if "id" not in n:
                raise CircuitkitError(f"circuit JSON node {i} has no 'id': {n}")
            nodes.append((n.pop("id"), n))
        for i, e in enumerate(d["edges"]):
            e = dict(e)
            if "source" not in e or "target" not in e:
                raise CircuitkitError(f"circuit JSON edge {i} needs 'source' and 'target': {e}")
            edges.append((e.pop("source"), e.pop("target"), e))
        return _assemble(d.get("graph", {}), nodes, edges)

    # ---- networkx ---------------------------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph keyed by node spellings, with every attribute."""
        g = nx.DiGraph(**self.attrs)
        for n in self.nodes:
            g.add_node(str(n), **self.node_attrs.get(n, {}))
        for e in self.edges:
            g.add_edge(str(e.sender), str(e.receiver), **self.edge_attrs.get(e, {}))
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> Circuit:
        """The circuit of a DiGraph keyed by node spellings (as ``circuit/graph.py`` builds it)."""
        return _assemble(g.graph, list(g.nodes(data=True)), list(g.edges(data=True)))


def _check_unique(what: str, items: Iterable[Node | Edge]) -> None:
    seen: set[Node | Edge] = set()
    twice = [str(x) for x in items if x in seen or seen.add(x)]
    if twice:
        raise CircuitkitError(f"{what}s listed twice in a circuit: {', '.join(dict.fromkeys(twice))}")


def _assemble(attrs: Mapping[str, Any], nodes: Iterable[tuple[NodeLike, Mapping[str, Any]]],
              edges: Iterable[tuple[NodeLike, NodeLike, Mapping[str, Any]]]) -> Circuit:
    """A circuit built as networkx builds a graph: a repeated node or edge updates its attributes, an edge's
    unlisted end becomes a node without attributes."""
    node_attrs: dict[Node, dict[str, Any]] = {}
    for n, d in nodes:
        node_attrs.setdefault(Node.of(n), {}).update(d)
    edge_attrs: dict[Edge, dict[str, Any]] = {}
    for a, b, d in edges:
        e = Edge.of(a, b)
        for end in (e.sender, e.receiver):
            node_attrs.setdefault(end, {})
        edge_attrs.setdefault(e, {}).update(d)
    return Circuit(tuple(node_attrs), tuple(edge_attrs), dict(attrs), node_attrs, edge_attrs)


__all__ = ["Node", "Edge", "Circuit", "NodeLike", "EdgeLike", "NODE_KINDS", "OUTPUT_PREFIX", "INPUT_HELP"]
