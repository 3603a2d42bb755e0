"""Hypotheses -> verified circuit -> faithfulness on a trained probed model (issue #5 "must show").

Writes a small report directory (Markdown + JSON + circuit JSON/GraphML/DOT/SVG/PNG):

    .venv/bin/python benchmarks/circuit_discovery.py runs/models/addition --out reports/addition_circuit \
        --positions =,A1,A2,A3
    .venv/bin/python benchmarks/circuit_discovery.py runs/models/counting --out reports/counting_circuit \
        --sites a0.0,a1.0,m0,m1 --positions :

Preimages come from ``PoolPreimage`` (exact, over a pool of task inputs); every verification runs
beside its two null controls (random-init model, shuffled feature).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from circuitkit.circuit.discover import discover_circuit
from circuitkit.circuit.export import export_all
from circuitkit.hypotheses.scoring import format_report
from circuitkit.io_utils import atomic_write_json, atomic_write_text
from circuitkit.models.checkpoint import load_probed
from circuitkit.sites import expand_sites
from circuitkit.verification.report import format_verification


def routing_table(nodes, graph) -> list[dict]:
    """Per answer: which verified nodes carry which features into it (directly or through a path edge)."""
    rows = []
    answers = sorted({t for n in nodes for t in n.targets})
    for a in answers:
        for n in nodes:
            if a in n.targets:
                rows.append({"answer": a, "site": n.site, "features": list(n.features), "effect": n.effect,
                             "iia": n.iia, "joint": n.joint})
    return rows


def slim_verification(ver: dict) -> dict:
    """Controls and tests that were not necessary anywhere keep their verdict and largest necessity
    effect only (the control summary is in the file too)."""
    def slim(c: dict) -> dict:
        effs = [t["effect"][0] for t in c["targets"].values() if t["effect"]]
        return {"site": c["site"], "features": c["features"], "condition": c["condition"], "verified": c["verified"],
                "max_effect": max(effs, default=None)}

    return {**ver, "controls": [slim(c) for c in ver["controls"]],
            "verdicts": [v if v["necessary_targets"] else slim(v) for v in ver["verdicts"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sites", help="default: every head and MLP")
    ap.add_argument("--positions", required=True)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--inputs", type=int, default=3000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--eval-inputs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pm = load_probed(args.model)
    sites = expand_sites(args.sites, args.positions, pm)
    disc = discover_circuit(pm, sites, n_queries=args.queries, pool=args.pool, n_inputs=args.inputs,
                            n_pairs=args.pairs, eval_inputs=args.eval_inputs, seed=args.seed,
                            model_name=str(args.model))
    out = Path(args.out)
    ev = disc.evaluation
    # context: the same evaluation for every node that passed necessity (sufficient or not)
    from circuitkit.circuit.evaluate import evaluate_circuit

    nec_sites = sorted({v.site for v in disc.verification.verdicts if v.necessary_targets}
                       | {n.site for n in disc.verification.nodes})
    ev_nec = evaluate_circuit(pm, nec_sites, n=args.eval_inputs, seed=args.seed) if nec_sites else None
    extra = {"evaluation": ev.to_dict() if ev else None,
             "controls_summary": disc.verification.to_dict()["controls_summary"]}
    files = export_all(disc.graph, out, extra=extra)
    hyp = disc.hypotheses.to_dict()
    # keep the report small: accepted hypotheses with evidence + the best 5 per site
    hyp["hypotheses"] = [h for h in hyp["hypotheses"] if h["accepted"] or h["rank"] <= 5]
    for h in hyp["hypotheses"]:
        h["examples"] = h["examples"][:2] if h["rank"] <= 3 else []
    atomic_write_json(out / "hypotheses.json", hyp)
    ver = slim_verification(disc.verification.to_dict(compact=True))  # [mean, CI low, CI high] per answer
    atomic_write_json(out / "verification.json", ver)
    summary = {
        "model": str(args.model), "task": pm.task.name, "model_meta_metrics": _metrics(args.model),
        "sites": [str(s) for s in sites], "settings": vars(args),
        **disc.summary(), "routing": routing_table(disc.verification.nodes, disc.graph),
        "faithfulness": ev.faithfulness if ev else None,
        "faithfulness_normalized": ev.faithfulness_normalized if ev else None,
        "completeness": ev.to_dict()["completeness"] if ev else None,
        "minimal": ev.minimal if ev else None,
        "necessary_nodes": nec_sites,
        "faithfulness_necessary_nodes": ev_nec.faithfulness if ev_nec else None,
        "completeness_necessary_nodes": ev_nec.to_dict()["completeness"] if ev_nec else None,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()} (shared 2-core box)",
        "files": files,
    }
    atomic_write_json(out / "summary.json", summary)
    md = [f"# Circuit discovery: {pm.task.name} ({args.model})", "",
          f"Command: `.venv/bin/python benchmarks/circuit_discovery.py {args.model} --out {args.out} "
          f"--positions {args.positions}" + (f" --sites {args.sites}" if args.sites else "") + "`", "",
          f"Wall time {summary['wall_seconds']} s ({summary['machine']}); stages: {disc.timings}", "",
          "## Ranked hypotheses per site", "", "```", format_report(disc.hypotheses, 5), "```", "",
          "## Verification (interchange, with null controls)", "", "```", format_verification(disc.verification),
          "```", "", "## Routing: which verified nodes carry what into each answer", "",
          "| answer | site | features | effect | IIA |", "|---|---|---|---|---|"]
    for r in summary["routing"]:
        iia = "" if r["iia"] is None else f"{r['iia']:.2f}"
        md.append(f"| {r['answer']} | {r['site']} | {' + '.join(r['features'])}{' (joint)' if r['joint'] else ''} "
                  f"| {r['effect']:.2f} | {iia} |")
    md += ["", "## Circuit edges (path patching)", ""]
    for a, b, d in disc.graph.edges(data=True):
        md.append(f"- {a} → {b} [{d['feature']}] effect {float(d['effect']):.2f}"
                  + (f" (CI low {float(d['ci_low']):.2f})" if d["kind"] == "path" else " (verified answer)"))
    if ev:
        md += ["", "## Faithfulness, completeness, minimality (resample ablation)", "",
               "| answer | full acc | circuit-only acc | all-ablated acc | faithfulness | normalized | completeness |",
               "|---|---|---|---|---|---|---|"]
        for k in ev.full:
            f = lambda x: "n/a" if x is None or x != x else f"{x:.3f}"  # noqa: E731
            md.append(f"| {k} | {f(ev.full[k])} | {f(ev.circuit[k])} | {f(ev.empty[k])} | {f(ev.faithfulness[k])} "
                      f"| {f(ev.faithfulness_normalized[k])} | {f(ev.completeness[k])} |")
        md += ["", f"Minimal (every component node contributes > {ev.min_contribution}): {ev.minimal}; "
                   f"per-node contribution (pooled): " +
               ", ".join(f"{k} {v.get('all', float('nan')):.3f}" for k, v in ev.minimality.items())]
    if ev_nec:
        md += ["", f"For context, the circuit of every node that passed necessity ({len(nec_sites)} sites, "
                   "sufficient or not): faithfulness " +
               ", ".join(f"{k} {v:.3f}" for k, v in ev_nec.faithfulness.items()) + "; completeness " +
               ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in
                         ev_nec.to_dict()["completeness"].items())]
    md += ["", "![circuit](circuit.svg)", ""]
    atomic_write_text(out / "README.md", "\n".join(md))
    print("\n".join(md))


def _metrics(model: str) -> dict | None:
    p = Path(model) / "metrics.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return {k: d.get(k) for k in ("metric", "accuracy", "accuracy_ci95", "n", "train_steps")}


if __name__ == "__main__":
    main()
