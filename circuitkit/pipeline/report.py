"""Assemble a case study's report from the stage results and write it (HTML + Markdown + JSON)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitkit.io_utils import atomic_dir, atomic_write_json
from circuitkit.report.document import Figure, HtmlPanel, Report, Table
from circuitkit.report.figures import line_plot
from circuitkit.report.html import render_html
from circuitkit.report.markdown import render_markdown

if TYPE_CHECKING:
    from circuitkit.pipeline.run import RunContext


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def model_section(report: Report, res: dict[str, Any]) -> None:
    m = res["metrics"]
    s = report.section("Probed model")
    lo, hi = m["accuracy_ci95"]
    s.add(f"Source: {res['source']}. Held-out {m['metric']} = **{_pct(m['accuracy'])}** "
          f"(95% Wilson CI {_pct(lo)}–{_pct(hi)}, n = {m['n']} of {m['split_size']} test examples).")
    rows = [["accuracy", m["accuracy"]], ["n evaluated", m["n"]]]
    if "train_wall_seconds" in m:
        rows.append(["training wall time (s)", m["train_wall_seconds"]])
        rows.append(["training steps", m["train_steps"]])
    if "mean_logit_diff" in m:
        rows += [["prefers answer over competitor", m["prefers_answer"]], ["mean logit difference", m["mean_logit_diff"]]]
    cfg = res.get("config")
    if cfg:
        rows.append(["architecture", f"{cfg['n_layer']} layers, {cfg['n_head']} heads, d_model {cfg['d_model']}"])
    s.add(Table(["quantity", "value"], rows))


def decoder_section(report: Report, res: dict[str, Any]) -> None:
    s = report.section("InversionView decoder")
    ev = res["eval"]
    rows = [[r["site"], r["hit_rate"], r["in_eps_fraction"], r["median_min_distance"], r["n_queries"],
             r["samples_per_query"]] for r in ev.get("sites", [])]
    s.add(f"Trained {res.get('steps')} steps in {res.get('train_minutes')} minutes. Hit rate = share of held-out "
          "query activations with at least one decoder sample within ε = 0.1 (every sample re-run through the "
          "probed model); in-ε fraction = share of all samples within ε.")
    s.add(Table(["site", "hit rate", "in-ε fraction", "median min distance", "queries", "samples/query"], rows,
                caption="Decoder quality per site (held-out test-split queries)"))
    curve = res.get("curve") or []
    if curve:
        xs = [c["train_minutes"] for c in curve]
        series: dict[str, list[float]] = {}
        for c in curve:
            for site, h in c["hit_rate"].items():
                series.setdefault(site, []).append(h)
        s.add(Figure("decoder_curve", line_plot(xs, series, "Decoder training: hit rate per site",
                                                "training minutes", "hit rate (small-sample estimate)", hline=0.9),
                     "Hit rate per site estimated during training, against training minutes."))


def inversion_section(report: Report, res: dict[str, Any], stage_dir: Path) -> None:
    s = report.section("InversionView panels")
    s.add("Samples sorted by distance to the query activation; the dashed line is ε = 0.1. Token colour: "
          "p(token | query) − p(token | BOS activation at the same site) — blue raises, red lowers.")
    for p in res["panels"]:
        page = (stage_dir / p["file"]).read_text()
        frame = (f'<iframe title="panel" style="width:100%;height:420px;border:1px solid #ddd" '
                 f'sandbox srcdoc="{html.escape(page, quote=True)}"></iframe>')
        lines = [f"**{p['site']}** on `{p['input']}`: {p['in_eps']} of {p['n_samples']} samples within ε.", ""]
        lines += ["| distance | sample |", "|---|---|"]
        lines += [f"| {r['distance']:.4f}{' (in ε)' if r['in_eps'] else ''} | `{r['text']}` |" for r in p["rows"][:20]]
        s.add(HtmlPanel(f"<h3>{html.escape(p['site'])} — <code>{html.escape(p['input'])}</code></h3>"
                        f"<p>{p['in_eps']} of {p['n_samples']} samples within ε.</p>{frame}", "\n".join(lines)))


def claims_section(report: Report, ctx: "RunContext") -> None:
    s = report.section("The paper's claims beside circuitkit's verification")
    rows = []
    for c in ctx.cfg.paper_claims:
        verdict = ctx.results.get("claims", {}).get(c.get("claim", ""), "not evaluated in this run")
        rows.append([c.get("claim", ""), c.get("check", ""), verdict])
    s.add(Table(["paper's claim", "what circuitkit checks", "circuitkit's result"], rows))


def manifest_section(report: Report, manifest: dict[str, Any]) -> None:
    s = report.section("Reproducibility manifest")
    rows = [["seed", manifest["seed"]], ["git commit", manifest["git_commit"]], ["python", manifest["python"]],
            ["created", manifest["created"]]]
    rows += [[f"version: {k}", v] for k, v in manifest["versions"].items()]
    rows += [[f"stage time: {k} (s)", v] for k, v in manifest.get("stage_seconds", {}).items()]
    s.add(Table(["field", "value"], rows))
    s.add("The full configuration is in `manifest.json` next to this report.")


def build_report(ctx: "RunContext", manifest: dict[str, Any]) -> Report:
    cfg = ctx.cfg
    report = Report(f"circuitkit case study: {cfg.name}",
                    f"{cfg.description} {'Quick settings (smoke run).' if cfg.quick else 'Full settings.'}")
    r = ctx.results
    if "model" in r:
        model_section(report, r["model"])
    if "decoder" in r:
        decoder_section(report, r["decoder"])
    if "inversions" in r:
        inversion_section(report, r["inversions"], ctx.work / "inversions")
    for name, builder in SECTION_BUILDERS:
        if name in r:
            builder(report, r[name], ctx)
    claims_section(report, ctx)
    manifest_section(report, manifest)
    return report


#: extra sections added by later stages: (result key, fn(report, result, ctx))
SECTION_BUILDERS: list[tuple[str, Any]] = []


def write_report(report: Report, out: Path, manifest: dict[str, Any], results: dict[str, Any]) -> None:
    """index.html, report.md (+ figures/), manifest.json, results.json — replaced atomically."""
    page = render_html(report)
    md, files = render_markdown(report)
    with atomic_dir(out) as tmp:
        (tmp / "index.html").write_text(page)
        (tmp / "report.md").write_text(md)
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        atomic_write_json(tmp / "manifest.json", manifest)
        slim = {k: v for k, v in results.items() if k != "inversions"}
        (tmp / "results.json").write_text(json.dumps(slim, indent=1, default=str) + "\n")
