"""Draw a circuit graph with matplotlib (no graphviz binary): x = input position, y = depth."""
from __future__ import annotations

from pathlib import Path

import networkx as nx


def layout(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Position index on x, residual depth on y; nodes sharing a slot are spread sideways."""
    slots: dict[tuple[int, int], list[str]] = {}
    for n, d in g.nodes(data=True):
        slots.setdefault((int(d.get("index", 0)), int(d.get("depth", 0))), []).append(n)
    pos = {}
    for (x, y), ns in slots.items():
        for i, n in enumerate(sorted(ns)):
            pos[n] = (x + 0.6 * (i - (len(ns) - 1) / 2), float(y))
    return pos


def draw_circuit(g: nx.DiGraph, path: str | Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = layout(g)
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    fig, ax = plt.subplots(figsize=(max(6, 2.0 * (max(xs) - min(xs) + 2)), max(4, 1.6 * (max(ys) - min(ys) + 2))))
    colours = ["#f6d6a8" if g.nodes[n].get("kind") == "output" else "#cfe3f7" for n in g.nodes]
    labels = {}
    for n, d in g.nodes(data=True):
        feats = d.get("features") or []
        labels[n] = n if d.get("kind") == "output" else f"{n}\n{' + '.join(feats)}"
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colours, node_size=2000, node_shape="s", edgecolors="#555")
    nx.draw_networkx_labels(g, pos, labels, ax=ax, font_size=6)
    solid = [(a, b) for a, b, d in g.edges(data=True) if d.get("kind") != "output"]
    dashed = [(a, b) for a, b, d in g.edges(data=True) if d.get("kind") == "output"]
    nx.draw_networkx_edges(g, pos, edgelist=solid, ax=ax, arrows=True, arrowsize=14, node_size=2000)
    nx.draw_networkx_edges(g, pos, edgelist=dashed, ax=ax, arrows=True, arrowsize=12, style="dashed",
                           edge_color="#a0522d", node_size=2000)
    elabels = {(a, b): f"{d.get('feature', '')}" for a, b, d in g.edges(data=True) if d.get("kind") != "output"}
    nx.draw_networkx_edge_labels(g, pos, elabels, ax=ax, font_size=6)
    ax.set_xlabel("input position")
    ax.set_ylabel("residual-stream depth (2·layer + 1 = heads, + 2 = MLP)")
    ax.set_title(title or f"circuit: {g.graph.get('task', '')}")
    ax.margins(0.15)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


__all__ = ["layout", "draw_circuit"]
