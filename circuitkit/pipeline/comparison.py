"""The ``comparison`` stage: the case's circuit beside EAP, EAP-IG, exact edge patching and ACDC, scored the MIB
way on the same inputs (``circuitkit discover`` then ``circuitkit compare``, as one cached step of ``run``).

The methods score every edge on ``n`` aligned pairs drawn with the case's seed; every circuit, circuitkit's
included, is then judged on ``n`` other pairs (the next seed's), so no method is scored on the inputs it chose
its edges on.  A compiled model's ground truth (tracr) adds each method's edge ROC AUC."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitkit.pipeline.outputs import ComparisonSummary

if TYPE_CHECKING:
    from circuitkit.pipeline.run import RunContext
    from circuitkit.pipeline.stages import StageRunner

#: bumped when the stage's summary changes shape, so cached stages are recomputed
COMPARISON_SUMMARY_VERSION = 2


def stage_comparison(ctx: RunContext, runner: StageRunner) -> ComparisonSummary:
    from circuitkit.discovery.ground_truth import read_truth
    from circuitkit.discovery.harness import compare, curve_png, discovery_file, read_circuit, to_markdown, verdict
    from circuitkit.discovery.problem import build_problem
    from circuitkit.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text

    cfg, pm = ctx.cfg, ctx.probed
    assert pm is not None
    c = cfg.comparison
    circuit = ctx.results.circuit or {}
    circuit_file = (circuit.get("files") or {}).get("json")
    if not c.methods:
        return {"skipped": "[comparison] methods is empty"}
    if circuit.get("skipped") or not circuit_file:
        return {"skipped": f"no circuit to compare ({circuit.get('skipped') or 'the circuit stage wrote no JSON'})"}

    def fn(d: Path) -> dict[str, Any]:
        circuit_json = json.loads((ctx.work / "circuit" / circuit_file).read_text())
        scored_on, score_record = build_problem(pm, c.n, cfg.seed, c.ablation, sources=c.sources)
        files = {}
        for i, method in enumerate(c.methods):
            ctx.log(f"  comparison: {method} ({i + 1}/{len(c.methods)}) on {score_record['n']} pairs")
            files[method] = discovery_file(scored_on, method, {}, score_record)
            atomic_write_json(d / "circuits" / f"{method}.json", files[method])
        judged_on, judge_record = build_problem(pm, c.n, cfg.seed + 1, c.ablation, sources=c.sources)
        entries = [e for m, f in files.items() for e in read_circuit(judged_on.graph, f, m)]
        entries += read_circuit(judged_on.graph, circuit_json, "circuit.json")
        cmp = compare(judged_on, entries, read_truth(pm.path))
        drop = ("examples",)
        cmp["inputs"] = {"scored_on": {k: v for k, v in score_record.items() if k not in drop},
                         "judged_on": {k: v for k, v in judge_record.items() if k not in drop}}
        cmp["verdict"] = verdict(cmp)
        atomic_write_json(d / "comparison.json", cmp)
        atomic_write_text(d / "comparison.md", to_markdown(cmp) + "\n")
        if any("curve" in r for r in cmp["rows"]):
            atomic_write_bytes(d / "comparison.png", curve_png(cmp))
        return cmp

    key = [c.__dict__, cfg.seed, COMPARISON_SUMMARY_VERSION]
    return runner.run("comparison", key, fn)  # type: ignore[return-value]


__all__ = ["COMPARISON_SUMMARY_VERSION", "stage_comparison"]
