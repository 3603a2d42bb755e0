"""Export a circuit graph: JSON (node-link, readable by other tools; ``types.Circuit`` reads and writes it),
GraphML, DOT."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx

from circuitkit.io_utils import atomic_write_text
from circuitkit.types import Circuit


def to_json_dict(g: nx.DiGraph | Circuit, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"graph": attrs, "nodes": [{id, ...}], "edges": [{source, target, ...}], ...extra} (``Circuit.to_json``)."""
    c = g if isinstance(g, Circuit) else Circuit.from_networkx(g)
    return {**c.to_json(), **(extra or {})}


def from_json_dict(d: dict[str, Any]) -> nx.DiGraph:
    """The DiGraph of a circuit JSON dict (``Circuit.from_json``), every attribute kept."""
    return Circuit.from_json(d).to_networkx()


def _scalar(v: Any) -> Any:
    """GraphML holds str/int/float/bool only: lists become ' + '-joined strings, None ''."""
    if isinstance(v, (list, tuple)):
        return " + ".join(str(x) for x in v)
    if v is None:
        return ""
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def to_graphml_graph(g: nx.DiGraph) -> nx.DiGraph:
    h = nx.DiGraph(**{k: _scalar(v) for k, v in g.graph.items()})
    for n, d in g.nodes(data=True):
        h.add_node(n, **{k: _scalar(v) for k, v in d.items()})
    for a, b, d in g.edges(data=True):
        h.add_edge(a, b, **{k: _scalar(v) for k, v in d.items()})
    return h


def _dot_id(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text (no graphviz needed to write it)."""
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for n, d in g.nodes(data=True):
        if d.get("kind") == "output":
            label, fill = f"{n}", "#f6d6a8"
        else:
            label, fill = f"{n}\\n{_scalar(d.get('features', ''))}", "#cfe3f7"
        lines.append(f"  {_dot_id(n)} [label={_dot_id(label)}, fillcolor={_dot_id(fill)}];")
    for a, b, d in g.edges(data=True):
        lab = f"{d.get('feature', '')} ({float(d.get('effect', 0)):.2f})"
        style = "dashed" if d.get("kind") == "output" else "solid"
        lines.append(f"  {_dot_id(a)} -> {_dot_id(b)} [label={_dot_id(lab)}, style={style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def export_all(g: nx.DiGraph, out_dir: str | Path, stem: str = "circuit", extra: dict[str, Any] | None = None,
               picture: bool = True) -> dict[str, str]:
    """Write <stem>.json, .graphml, .dot (and .svg/.png pictures); returns {format: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "graphml": out / f"{stem}.graphml", "dot": out / f"{stem}.dot"}
    atomic_write_text(paths["json"], json.dumps(to_json_dict(g, extra), indent=2, default=str) + "\n")
    tmp = paths["graphml"].with_suffix(".graphml.tmp")
    nx.write_graphml(to_graphml_graph(g), tmp)
    tmp.replace(paths["graphml"])
    atomic_write_text(paths["dot"], to_dot(g))
    if picture:
        from circuitkit.circuit.draw import draw_circuit

        for fmt in ("svg", "png"):
            paths[fmt] = out / f"{stem}.{fmt}"
            draw_circuit(g, paths[fmt])
    return {k: str(v) for k, v in paths.items()}


__all__ = ["to_json_dict", "from_json_dict", "to_graphml_graph", "to_dot", "export_all"]
