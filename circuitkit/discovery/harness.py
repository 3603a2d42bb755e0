"""``discover`` and ``compare`` as library calls: one method's circuit file, and a table of circuits scored on
the same inputs (what ``circuitkit discover`` / ``circuitkit compare`` and the case-study reports print)."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from circuitkit.discovery.compare import MIB_PERCENTS, faithfulness, faithfulness_at, mib_curve, roc_auc
from circuitkit.discovery.edge_graph import EdgeGraph, edge_count
from circuitkit.discovery.methods import DiscoveryProblem, discover
from circuitkit.discovery.problem import circuit_edges, moving_edges, truth_mask
from circuitkit.errors import CircuitkitError

#: methods a comparison runs by default (``exact`` scores every edge one by one; ``acdc`` tries every edge)
DEFAULT_METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "exact", "acdc")
SCORED_PERCENT = 5.0  # the circuit a score-only method's file marks in_graph (MIB re-thresholds from scores)


def discovery_file(p: DiscoveryProblem, method: str, settings: Mapping[str, Any], record: Mapping[str, Any],
                   percent: float = SCORED_PERCENT) -> dict[str, Any]:
    """Run ``method`` and return its MIB JSON, with circuitkit's record (method, settings, seconds, inputs)."""
    res = discover(p, method, **settings)
    g = p.graph
    keep = res.kept if res.kept is not None else g.top_edges(res.scores, edge_count(g, percent))
    extra = {"circuitkit": {"method": method, "settings": {**res.settings, **settings}, "seconds": round(res.seconds, 4),
                            "in_graph": "the method's own circuit" if res.kept is not None else
                            f"top {percent}% of edges by score, pruned", "inputs": dict(record)}}
    return g.to_mib_json(res.scores, keep, extra)


def read_circuit(graph: EdgeGraph, d: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The entries of a comparison from a file's JSON: a discovery file (MIB JSON), or circuitkit's circuit.json
    (two entries: its heads and MLPs, and ``circuitkit+bundles`` with its residual nodes' bundles as well)."""
    if "cfg" in d and isinstance(d.get("edges"), Mapping):
        scores, keep = graph.from_mib_json(d)
        meta = d.get("circuitkit", {})
        ranked = meta.get("method") != "circuitkit"
        return [{"name": meta.get("method", name), "scores": scores, "keep": keep, "ranked": ranked,
                 "seconds": meta.get("seconds")}]
    if isinstance(d.get("nodes"), list):
        out = []
        for label, bundles in (("circuitkit", False), ("circuitkit+bundles", True)):
            keep, scores = circuit_edges(graph, d, bundles)
            out.append({"name": label, "scores": scores, "keep": keep, "ranked": False, "seconds": None})
        return out
    raise CircuitkitError(f"{name}: neither a discovery file (MIB JSON with 'cfg' and 'edges') nor a circuitkit "
                          "circuit.json (node-link 'nodes' and 'edges')")


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def compare(p: DiscoveryProblem, entries: Sequence[dict[str, Any]], truth: Mapping[str, Any] | None = None,
            percents: Sequence[float] = MIB_PERCENTS) -> dict[str, Any]:
    """Score every entry on ``p``: MIB CPR / CMD and the curve (ranked methods), its own circuit's size and
    faithfulness, every ranked method's faithfulness at circuitkit's edge count, and ROC AUC against ``truth``:
    all of it, and the part the problem's ablation moves (``moving_edges``; the truth it cannot move is left out of
    that ranking, since no method scoring by this ablation can see it)."""
    g = p.graph
    ref = next((e for e in entries if e["name"] == "circuitkit"), None)
    ref_n = int(ref["keep"].sum()) if ref is not None else None
    truth_keep = truth_mask(g, truth) if truth is not None else None
    moving = moving_edges(p) if truth_keep is not None else None
    visible = truth_keep & moving if moving is not None else None
    judged = ~(truth_keep & ~moving) if moving is not None else None
    rows = []
    for e in entries:
        t0 = time.perf_counter()
        own_n = int(e["keep"].sum())
        row: dict[str, Any] = {"method": e["name"], "edges": own_n,
                               "faithfulness": _num(float(faithfulness(p, e["keep"])[0])) if own_n else None,
                               "seconds": e.get("seconds")}
        if e["ranked"]:
            curve = mib_curve(p, e["scores"], percents)
            row.update({"cpr": curve.cpr, "cmd": curve.cmd, "curve": curve.to_dict()})
            if ref_n is not None:
                row["faithfulness_at_circuitkit_size"] = _num(faithfulness_at(p, e["scores"], ref_n))
        if truth_keep is not None:
            ranking = e["scores"] if e["ranked"] else e["keep"].float() + e["scores"] * 1e-6
            row["roc_auc"] = _num(roc_auc(g, ranking, truth_keep))
            if visible is not None:
                row["roc_auc_visible"] = _num(roc_auc(g, ranking, visible, among=judged))
        row["scoring_seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
    return {"n_edges_total": g.n_edges, "percents": list(percents), "circuitkit_edges": ref_n,
            "truth_edges": int(truth_keep.sum()) if truth_keep is not None else None,
            "visible_truth_edges": int(visible.sum()) if visible is not None else None,
            "roc_auc_ceiling": _num(auc_ceiling(int(visible.sum()), int(truth_keep.sum()))) if visible is not None
            else None,
            "invisible_truth_edges": ([f"{g.senders[i].name}->{g.receivers[j].name}"
                                       for i, j in (truth_keep & ~moving).nonzero().tolist()]
                                      if visible is not None else None), "rows": rows,
            "definitions": "f = (m(C) - m(empty)) / (m(M) - m(empty)) over edges (MIB); CPR = area under f over "
                           "k/100 on the signed ranking (higher is better), CMD = area under |1 - f| on the |score| "
                           "ranking (lower is better); ROC AUC of |score| against the ground-truth edges (all of "
                           "them, and the visible ones: those the ablation moves, the invisible ones left out)"}


def auc_ceiling(visible: int, truth: int) -> float:
    """The highest edge ROC AUC against the whole truth that any score drawn from the ablation's effects can reach:
    an edge the ablation moves nothing along scores 0 under it, so at best it ties with every negative (each such
    pair counts one half) while the ``visible`` truth edges rank above all of them."""
    return (visible + 0.5 * (truth - visible)) / truth if truth else float("nan")


def verdict(cmp: Mapping[str, Any]) -> dict[str, Any]:
    """circuitkit's circuit against the best ranked method at its edge count (issue 32's question): both
    faithfulness figures, the best method's name and whether circuitkit's is at least as high (MIB's CPR
    reading: higher f is better); and the same by |1 − f| (CMD's reading: a circuit that overshoots the model,
    f > 1, is not more faithful), the method closest to the model and whether circuitkit's is as close.
    ``whole_graph``: circuitkit's circuit keeps every edge, where every method is the full model and the
    comparison says nothing (both "at least" readings are then None)."""
    rows = cmp.get("rows", [])
    own = next((r for r in rows if r["method"] == "circuitkit"), None)
    rivals = [r for r in rows if r.get("faithfulness_at_circuitkit_size") is not None]
    if own is None or own.get("faithfulness") is None or not rivals:
        return {"circuitkit_edges": cmp.get("circuitkit_edges"), "circuitkit_faithfulness": None,
                "best_method": None, "best_faithfulness": None, "at_least_best": None,
                "closest_method": None, "closest_faithfulness": None, "at_least_as_close": None, "whole_graph": None}
    f_own = own["faithfulness"]
    whole = own["edges"] is not None and own["edges"] == cmp.get("n_edges_total")
    best = max(rivals, key=lambda r: r["faithfulness_at_circuitkit_size"])
    closest = min(rivals, key=lambda r: abs(1 - r["faithfulness_at_circuitkit_size"]))
    return {"circuitkit_edges": own["edges"], "circuitkit_faithfulness": f_own,
            "best_method": best["method"], "best_faithfulness": best["faithfulness_at_circuitkit_size"],
            "at_least_best": None if whole else bool(f_own >= best["faithfulness_at_circuitkit_size"]),
            "closest_method": closest["method"], "closest_faithfulness": closest["faithfulness_at_circuitkit_size"],
            "at_least_as_close": None if whole else bool(abs(1 - f_own) <= abs(1 - closest["faithfulness_at_circuitkit_size"])),
            "whole_graph": whole}


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def comparison_table(cmp: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's table, (header, rows of formatted cells): what ``to_markdown`` and the case report show."""
    n_ck, truth = cmp.get("circuitkit_edges"), cmp.get("truth_edges") is not None
    vis = cmp.get("visible_truth_edges") is not None
    head = ["method", "edges (own circuit)", "faithfulness (own)"]
    head += [f"faithfulness at {n_ck} edges"] if n_ck is not None else []
    head += ["CPR ↑", "CMD ↓"] + (["edge ROC AUC"] if truth else []) + (["ROC AUC, visible truth"] if vis else [])
    head += ["seconds"]
    rows = []
    for r in cmp["rows"]:
        cells = [r["method"], _fmt(r["edges"]), _fmt(r["faithfulness"])]
        if n_ck is not None:
            cells.append(_fmt(r["faithfulness"]) if r["method"] == "circuitkit" else _fmt(r.get("faithfulness_at_circuitkit_size")))
        cells += [_fmt(r.get("cpr")), _fmt(r.get("cmd"))] + ([_fmt(r.get("roc_auc"))] if truth else [])
        cells += [_fmt(r.get("roc_auc_visible"))] if vis else []
        rows.append(cells + [_fmt(r.get("seconds"))])
    return head, rows


def to_markdown(cmp: Mapping[str, Any], title: str = "Circuit discovery, side by side") -> str:
    """The comparison as a Markdown table."""
    head, rows = comparison_table(cmp)
    lines = [f"### {title}", "", f"{cmp['n_edges_total']} edges in the model's graph; every figure on the same inputs.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", cmp["definitions"] + "."]
    hidden = cmp.get("invisible_truth_edges")
    if hidden:
        lines += ["", f"Ground-truth edges this ablation moves nothing along ({len(hidden)} of {cmp['truth_edges']}; "
                      f"no method scoring by it can see them): {', '.join(hidden)}. They score 0 at best tied with "
                      f"the negatives, so no score by this ablation reaches an edge ROC AUC above "
                      f"{cmp['roc_auc_ceiling']:.3f} against the whole truth."]
    return "\n".join(lines)


def curve_png(cmp: Mapping[str, Any]) -> bytes:
    """f against the % of edges kept, one line per ranked method (log x)."""
    from circuitkit.report.figures import line_plot

    series = {r["method"]: r["curve"]["faithfulness"] for r in cmp["rows"] if "curve" in r}
    return line_plot(cmp["percents"], series, "faithfulness of the top-k% edges", "% of edges kept (log)",
                     "faithfulness f", hline=1.0, logx=True)


def load_entries(graph: EdgeGraph, paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Entries from files, or from directories (every ``*.json`` discovery file and ``circuit.json`` in them)."""
    from circuitkit.validate import read_json

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob("*.json") if f.name not in ("manifest.json", "comparison.json"))
            if not found:
                raise CircuitkitError(f"{p} holds no circuit files (*.json from `circuitkit discover`, or circuit.json)")
            files += found
        else:
            files.append(p)
    return [e for f in files for e in read_circuit(graph, read_json(f, "circuit file"), f.stem)]


__all__ = ["DEFAULT_METHODS", "auc_ceiling", "compare", "comparison_table", "curve_png", "discovery_file", "load_entries", "read_circuit",
           "to_markdown", "verdict"]
