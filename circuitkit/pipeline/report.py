"""Assemble a case study's report from the stage results and write it (HTML + Markdown + JSON)."""
from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitkit.io_utils import atomic_dir, atomic_write_json
from circuitkit.pipeline.config import repo_relative
from circuitkit.report.document import Figure, HtmlPanel, Report, Table
from circuitkit.report.figures import heatmap, line_plot
from circuitkit.report.html import render_html
from circuitkit.report.markdown import render_markdown

if TYPE_CHECKING:
    from circuitkit.pipeline.outputs import CaseResults
    from circuitkit.pipeline.run import RunContext


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def model_section(report: Report, res: dict[str, Any]) -> None:
    m = res["metrics"]
    s = report.section("Probed model")
    lo, hi = m["accuracy_ci95"]
    s.add(f"Source: {repo_relative(res['source'])}. Held-out {m['metric']} = **{_pct(m['accuracy'])}** "
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
    where = f"Trained elsewhere ({repo_relative(res['source'])}; not retrained by this run): " if res.get("source") else "Trained "
    s.add(f"{where}{res.get('steps')} steps in {res.get('train_minutes')} minutes. Hit rate = share of held-out "
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
        body = re.search(r"<table>.*</table>", page, re.S)
        frame = f'<div class="ivpanel">{body.group(0) if body else ""}</div>'
        lines = [f"**{p['site']}** on `{p['input']}`: {p['in_eps']} of {p['n_samples']} samples within ε.", ""]
        lines += ["| distance | sample |", "|---|---|"]
        lines += [f"| {r['distance']:.4f}{' (in ε)' if r['in_eps'] else ''} | `{r['text']}` |" for r in p["rows"][:20]]
        s.add(HtmlPanel(f"<h3>{html.escape(p['site'])} — <code>{html.escape(p['input'])}</code></h3>"
                        f"<p>{p['in_eps']} of {p['n_samples']} samples within ε.</p>{frame}", "\n".join(lines)))


def patching_section(report: Report, res: dict[str, Any], ctx: RunContext) -> None:
    import numpy as np

    s = report.section("Activation patching")
    s.add(f"Interchange patching of each component × position from a contrast input into {res['n']} test inputs; "
          f"metric: logit difference (answer − contrast's answer) at target `{res['target']}`. Cells show the "
          "mean decrease of the logit difference (positive = the component at that position carries what "
          "decides the answer). Contrast R: a random other example of the same length; F: a minimal edit.")
    n_layers, n_heads = ctx.probed.n_layers, ctx.probed.n_heads
    for key, m in res["maps"].items():
        contrast, kind = key.split("/")
        mean = np.asarray(m["mean"], dtype=float)
        effect = m["base_mean"] - mean
        if kind == "head":  # [layer, pos, head] -> rows a{L}.{H}
            rows = [f"a{L}.{h}" for L in range(n_layers) for h in range(n_heads)]
            grid = effect.transpose(0, 2, 1).reshape(n_layers * n_heads, -1)
        else:
            rows = [f"x{L}.pre" for L in range(n_layers)]
            grid = effect
        cols = [str(i) for i in range(grid.shape[1])]
        label = "R (random)" if contrast == "random" else "F (minimal edit)"
        s.add(Figure(f"patch_{contrast}_{kind}", heatmap(grid, rows, cols, f"{kind} x position, contrast {label}",
                                                         "decrease of logit difference"),
                     f"{kind} × position interchange patching, contrast {label}; clean mean LD {m['base_mean']:.2f}."))


def groups_section(report: Report, res: dict[str, Any], ctx: RunContext) -> None:
    s = report.section("Cumulative group patching")
    s.add("Groups of sites patched cumulatively from the contrast input, forward and backward, as in the "
          "paper's tables; values are mean decreases of the logit difference (paper values in brackets "
          "where the paper reports them).")
    s.add(HtmlPanel(_md_table_html(res["markdown"]), res["markdown"]))
    rows = []
    for c, r in res["results"].items():
        for st in r["steps"]:
            dec = st["decrease"]
            rows.append([c, st["order"], " + ".join(st["groups"]), dec.get("mean"), dec.get("ci_low"),
                         dec.get("ci_high")])
    s.add(Table(["contrast", "order", "groups patched", "LD decrease", "95% CI low", "95% CI high"], rows,
                caption="With bootstrap confidence intervals"))


def _md_table_html(md: str) -> str:
    """The few Markdown tables the patching module writes, as HTML (pipe tables only)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(md)}</pre>"
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _ci_text(point: Any, ci: Any) -> str:
    if point is None:
        return "–"
    if not ci or ci[0] is None:
        return _fmt(point)
    return f"{_fmt(point)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _normalized_text(point: Any, ci: Any) -> str:
    """A normalised faithfulness with its CI, or "undefined" (null or NaN: see ``circuit/evaluate.py``)."""
    if point is None or (isinstance(point, float) and point != point):
        return "undefined"
    return _ci_text(point, ci)


def screen_section(report: Report, res: dict[str, Any], ctx: RunContext) -> None:
    import numpy as np

    s = report.section("Coverage screen")
    if "skipped" in res:
        s.add(f"Not run: {res['skipped']} ({len(res.get('kept', []))} sites).")
        return
    s.add(f"Every decoder site at every named position is patched from an aligned source (same layout) into "
          f"{res['n_examples']} test inputs. {res['rule']}. **{len(res['kept'])} of {len(res['rows'])}** "
          "site-positions are kept; hypotheses are generated and verified at exactly those.")
    sites = res["sites"]
    positions = [p for p in res["positions"]]
    grid = np.full((len(sites), len(positions)), np.nan)
    for r in res["rows"]:
        node, _, pos = r["site"].partition("@")
        if node in sites and pos in positions:
            grid[sites.index(node), positions.index(pos)] = r["change"]
    s.add(Figure("screen", heatmap(grid, sites, positions, "Answer change rate under aligned resample patching",
                                   "change rate", center_zero=False),
                 f"Blank cells: positions absent from the inputs, or read after every answer. Threshold "
                 f"{res['threshold']}."))


def verified_node_rows(nodes: list[dict[str, Any]]) -> list[list[Any]]:
    """One report row per finding: the members of a site group share one test, so a group is one row."""
    rows, seen = [], set()
    for n in nodes:
        members = tuple(n.get("group") or (n["site"],))
        key = (members, tuple(n["features"]))
        if key in seen:
            continue
        seen.add(key)
        rows.append([" & ".join(members), ", ".join(n["features"]), ", ".join(n["targets"]),
                     _ci_text(n.get("iia"), n.get("iia_ci")), n.get("level", "answer"), n["effect"], ", ".join(n.get("hold", [])) or "nothing",
                     "yes" if n.get("confirmed") else ("–" if n.get("confirmed") is None else "no"),
                     " / ".join(n.get("prediction", [])) or "–"])
    return rows


def circuit_section(report: Report, res: dict[str, Any], ctx: RunContext) -> None:
    """Hypotheses (this part), then ``verification_part`` and ``circuit_part`` from the circuit stage's files."""
    s = report.section("Hypotheses, verification and the circuit")
    if "skipped" in res:
        s.add(f"Skipped: {res['skipped']}.")
        return
    d = ctx.work / "circuit"
    hyp = json.loads((d / "hypotheses.json").read_text())
    ver = json.loads((d / "verification.json").read_text())
    used = hyp.get("preimage_source_by_site", {})
    by_src: dict[str, int] = {}
    for v in used.values():
        by_src[v] = by_src.get(v, 0) + 1
    s.add(f"Preimages from: **{res['source']}** ({', '.join(f'{k}: {n} sites' for k, n in by_src.items())}) at "
          f"{len(res.get('sites', []))} sites. {hyp.get('n_tested', 0)} hypotheses tested, "
          f"{hyp.get('n_accepted', 0)} accepted. Acceptance: {hyp.get('thresholds_text', '')}")
    top = [h for h in hyp.get("hypotheses", []) if h.get("accepted")][:30]
    s.add(Table(["site", "feature", "agreement", "baseline", "lift", "kappa", "q (BH)"],
                [[h["site"], h["feature"], h["agreement"], h["baseline"], h["lift"], h["kappa"], h["q_value"]]
                 for h in top], caption="Accepted hypotheses, ranked (top 30)"))
    verification_part(report, ver, res)
    circuit_part(report, res, d)


def verification_part(report: Report, ver: dict[str, Any], res: dict[str, Any]) -> None:
    """The verified nodes (learned and architectural), the rejected tests and the null controls."""
    s2 = report.section("Verification by interchange on fair pairs")
    s2.add(f"Rules: {ver.get('thresholds_text', '')}.")

    header = ["site (a group: patched together)", "features", "answers", "IIA [CI]", "level", "effect",
              "fair sources held fixed", "held-out confirmation", "predicted by"]
    learned = [n for n in ver.get("nodes", []) if not n.get("architectural")]
    arch = [n for n in ver.get("nodes", []) if n.get("architectural")]
    s2.add(Table(header, verified_node_rows(learned),
                 caption="Learned findings: verified nodes (IIA is the main criterion; a site group verifies only "
                         "patched together, as one row; level \"logit\": a component that never flips the answer, "
                         "whose IIA is the graded one on logits)"))
    s2.add(Table(header, verified_node_rows(arch),
                 caption="Architectural claims: verified on the real model AND on the random-init model (true by "
                         "construction; not counted as findings)"))
    rejected = [v for v in ver.get("verdicts", []) if not v["verified"]][:40]
    rows = []
    for v in rejected:
        best = max(v["targets"], key=lambda r: (r.get("relevant", False), (r.get("iia") or {}).get("mean", -1)),
                   default=None)
        iia = (best or {}).get("iia")
        rows.append([v["site"], " + ".join(v["features"]), v["split"],
                     "–" if not iia else f"{iia['mean']:.2f} [{iia['ci_low']:.2f}, {iia['ci_high']:.2f}]",
                     "–" if not best or not best.get("change_agree") else f"{best['change_agree']['mean']:.2f}",
                     v.get("note", "")])
    s2.add(Table(["site", "features", "split", "IIA [CI]", "change when f agrees", "note"], rows,
                 caption="Rejected tests (first 40)"))
    cs = ver.get("controls_summary", {})
    rm = res.get("random_model") or {}
    ctrl_rows = []
    for k, v in cs.items():
        meaning = ("must verify nothing" if v.get("must_verify_nothing") else
                   "verified here = architectural claim (reported apart)")
        if k == "proxy" and ver.get("settings", {}).get("proxy_controls_skipped"):
            skipped = ver["settings"]["proxy_controls_skipped"]
            meaning += ("; skipped where the site is itself verified to carry the proxy (no null there): "
                        + ", ".join(f"{p} at {s} (beside {f})" for s, f, p in skipped))
        ctrl_rows.append([k, v["tested"], v["verified"], meaning])
    s2.add(Table(["null control", "tests run", "tests verified", "meaning"], ctrl_rows,
                 caption=(f"Null controls beside every test. Random-init model: weight std {rm.get('init_std')}, "
                          f"{rm.get('distinct_predictions')} distinct predictions, the most common on "
                          f"{_fmt(rm.get('top_share'), 2)} of answers.") if rm else "Null controls beside every test"))


def _per_answer_shares(res: dict[str, Any]) -> str:
    """"; per answer: A1 0.95, ..." when there is more than one answer."""
    per = {k: v for k, v in (res.get("explained_share_per_answer") or {}).items() if k != "all"}
    return "; per answer: " + ", ".join(f"{k} {_fmt(v)}" for k, v in per.items()) if len(per) > 1 else ""


def _level_text(res: dict[str, Any]) -> str:
    """How much of the explained share rests on labels verified at the logit level (components that never flip
    the answer), stated beside the share of the labels verified on the answer alone."""
    nodes = (res.get("summary") or {}).get("n_logit_level_nodes")
    answer = (res.get("explained_share_answer_level") or {}).get("all")
    if not nodes:
        return ""
    return (f" {nodes} verified node(s) never flip the answer and carry their feature at the logit level (graded "
            f"IIA); with the labels verified on the answer alone the share is {_fmt(answer)}.")


def _loop_text(res: dict[str, Any]) -> str:
    """What closing the loop did: the grown nodes re-examined by hypotheses and verification, and the result."""
    loop = res.get("loop") or {}
    if not loop.get("rounds"):
        return " Every node growth added had already been examined (or none was added)."
    n_claims = sum(len(r.get("inherited_claims", [])) for r in loop["rounds"])
    return (f" Before any node is called unexplained, the nodes growth added go back through hypotheses and "
            f"verification (alone, as joint features and as site groups, with their preimage hypotheses and "
            f"{n_claims} inherited claim(s): the features verified nodes carry, at their position and elsewhere): "
            f"{len(loop['examined'])} examined in "
            f"{len(loop['rounds'])} round(s), {len(loop['verified'])} gained a verified label "
            f"({', '.join(loop['verified']) or 'none'}); still unexplained after being tested: "
            f"{', '.join(loop['still_unexplained']) or 'none'}.")


def circuit_part(report: Report, res: dict[str, Any], d: Path) -> None:
    """The circuit: growth, its picture, node- and edge-level evaluation, the MIB curve and every edge test."""
    s3 = report.section("The circuit")
    growth, ev = res.get("growth") or {}, res.get("evaluation")
    s3.add(f"Circuit growth starts from the {len(growth.get('start', []))} verified node sites and adds components "
           f"(heads and MLPs at named positions) by single-node patching effect until normalised faithfulness reaches "
           f"the target on every answer; it added **{len(growth.get('added', []))}** unexplained node(s): "
           f"{', '.join(growth.get('added', [])) or 'none'}. Share of the circuit's effect that verified features "
           f"explain: **{_fmt(res.get('explained_share'))}** (faithfulness of the verified nodes alone / of the "
           f"whole circuit)" + _per_answer_shares(res) + "." + _level_text(res) + _loop_text(res))
    png = d / "circuit.png"
    if png.exists():
        s3.add(Figure("circuit", png.read_bytes(), "The circuit: verified nodes with the features they carry, "
                                                   "unexplained nodes added by growth; edges found by path patching, "
                                                   "labelled by the sender's feature."))
    if ev:
        rows = []
        for t in ev["target_names"] + ["all"]:
            n = ev["normalized"]
            rows.append([t, *(_normalized_text(n[m].get(t), ev["normalized_ci"][m].get(t)) for m in
                              ("logit_diff", "accuracy", "kl")),
                         _fmt(ev["means"]["logit_diff"]["full"].get(t), 2),
                         _fmt(ev["means"]["logit_diff"]["empty"].get(t), 2),
                         _fmt(ev["means"]["logit_diff"]["circuit"].get(t), 2), _fmt(ev["completeness"].get(t))])
        s3.add(Table(["answer", "faithfulness, logit difference [95% CI]", "accuracy (normalised)",
                      "KL (1 − KL(C)/KL(∅))", "m(M) LD", "m(∅) LD", "m(C) LD", "completeness"], rows,
                     caption=f"Node-level evaluation by aligned resample ablation (n = {ev['n']} inputs; "
                             f"minimal: {ev['minimal']}). A normalisation is undefined on an answer where the full "
                             "model does no better than the fully ablated one (m(M) <= m(∅), or KL(∅) ≈ 0); such "
                             "answers are left out of all."))
        s3.add(Table(["node", "minimality (all) [95% CI]"],
                     [[k, _ci_text(v.get("all"), ev["minimality_ci"].get(k, {}).get("all"))]
                      for k, v in ev["minimality"].items()], caption="Per-node minimality"))
    _structural_text(s3, res.get("structural_tests"))
    ee = res.get("edge_evaluation")
    if ee:
        fn = ee.get("faithfulness_normalized", {})
        s3.add(f"Edge-level faithfulness (each node reads other circuit nodes only along the graph's edges): "
               f"**{_fmt(fn.get('all'))}** (all answers; " + ", ".join(f"{k} {_fmt(v)}" for k, v in fn.items()
                                                                      if k != "all") + ").")
    curve = res.get("curve")
    if curve:
        s3.add(Figure("faithfulness_curve",
                      line_plot(curve["xs"], {"all answers": curve["ys"]}, "Faithfulness against circuit size",
                                "circuit size (share of components at named positions)",
                                "normalised faithfulness (LD)", hline=1.0),
                      f"Components added in the circuit's order, then the rest by patching effect (MIB). "
                      f"CPR = {_fmt(curve.get('cpr'))} (area under the curve, higher is better), CMD = "
                      f"{_fmt(curve.get('cmd'))} (area between the curve and 1, lower is better)."))
    edges = [e for e in res.get("edge_tests", [])]
    if edges:
        s3.add(Table(["sender", "receiver", "feature", "answer", "effect [CI]", "change when f agrees", "IIA"],
                     [[e["sender"], e["receiver"], e["feature"], e["target"],
                       f"{e['effect']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]",
                       _fmt(e.get("change_agree"), 2), _fmt(e.get("iia"), 2)] for e in edges],
                     caption="Every path-patching edge test (kept when the effect's CI low reaches the edge rule)"))
    if ev:
        text = ev.get("definitions", "")
        s3.add(HtmlPanel(f"<h3>Definitions</h3><pre>{html.escape(text)}</pre>", "Definitions:\n\n```\n" + text + "\n```"))
    s3.add("Exports: " + ", ".join(f"`{v}`" for v in res.get("files", {}).values()) + " (next to this report).")


def comparison_section(report: Report, ctx: RunContext) -> None:
    """The paper's ground truth beside the run's findings, for a task whose paper gives one
    (``circuitkit.paper.protocols``: IOI's head classes)."""
    from circuitkit.paper.protocols import paper_protocol

    pm = ctx.probed
    comparison = paper_protocol(pm.task.name).comparison
    if comparison is None:
        return
    s = report.section(comparison.title)
    if (pm.n_layers, pm.n_heads) != comparison.shape:
        s.add(comparison.other_shape.format(layers=pm.n_layers, heads=pm.n_heads))
        return
    maps = (ctx.results.patching or {}).get("maps", {})
    verified = {n["site"].split("@")[0] for n in (ctx.results.circuit or {}).get("verified_nodes", [])}
    s.add(Table(list(comparison.columns), comparison.rows(maps.get("minimal/head") or maps.get("random/head"),
                                                          verified, pm.n_layers, pm.n_heads)))


def verdict_text(v: dict[str, Any]) -> str:
    """One sentence: circuitkit's circuit against the best discovery method at its edge count."""
    if v.get("circuitkit_faithfulness") is None:
        return "circuitkit's circuit could not be set beside the methods (no circuit edges or no ranked method)."
    if v.get("whole_graph"):
        return (f"circuitkit's circuit as edges keeps every edge of the graph ({v['circuitkit_edges']}): at that size "
                "every method is the whole model (faithfulness 1), so the comparison says nothing here. Its components "
                "are position-resolved, and the position-free edge graph can only keep each of them at every position.")
    ok = "at least as faithful as" if v["at_least_best"] else "less faithful than"
    text = (f"circuitkit's labelled circuit ({v['circuitkit_edges']} edges) has faithfulness "
            f"{_fmt(v['circuitkit_faithfulness'])}; the best method at the same size, {v['best_method']}, has "
            f"{_fmt(v['best_faithfulness'])}: circuitkit's circuit is **{ok}** the best baseline here.")
    if v.get("at_least_as_close") is not None and v["at_least_as_close"] != v["at_least_best"]:
        near = "closer to" if v["at_least_as_close"] else "farther from"
        text += (f" By distance from the model's own output, |1 − f|, it is {near} the model than the closest "
                 f"baseline, {v['closest_method']} ({_fmt(v['closest_faithfulness'])}).")
    return text


def baselines_section(report: Report, res: dict[str, Any], ctx: RunContext) -> None:
    """The ``comparison`` stage: every discovery method and circuitkit's circuit, scored the MIB way on the same
    pairs (table, faithfulness against the % of edges kept, the verdict at circuitkit's size)."""
    from circuitkit.discovery.harness import comparison_table, curve_png

    s = report.section("Side by side with automatic circuit discovery")
    if res.get("skipped"):
        s.add(f"Not run: {res['skipped']}.")
        return
    scored, judged = res["inputs"]["scored_on"], res["inputs"]["judged_on"]
    methods = ", ".join(r["method"] for r in res["rows"] if "curve" in r)
    s.add(f"{res['n_edges_total']} sender → receiver-input edges in the model's graph (q, k and v apart). The methods "
          f"({methods}) scored every edge on {scored['n']} aligned pairs (seed {scored['seed']}); every circuit, circuitkit's too, "
          f"is judged on {judged['n']} other pairs (seed {judged['seed']}), {judged['ablation']} ablation, metric "
          f"{judged['metric']}. A method's circuit at a size keeps its best-scored edges (MIB); circuitkit's is its "
          f"heads and MLPs with the edges between them (`circuitkit+bundles` adds every edge its residual nodes "
          f"stand for).")
    s.add(verdict_text(res["verdict"]))
    s.add(Table(*comparison_table(res)))
    if any("curve" in r for r in res["rows"]):
        s.add(Figure("comparison_curve", curve_png(res), "Faithfulness of each method's top-k% edges (MIB's grid)."))
    s.add(res["definitions"] + ". Files: `comparison/comparison.json`, `comparison/circuits/METHOD.json` (MIB format).")


def _structural_text(section: Any, tests: list[dict[str, Any]] | None) -> None:
    """The zero-ablation pass (``circuit/structural.py``): what it tested, and the nodes and edges it kept."""
    if tests is None:
        return
    nodes = [t for t in tests if t["receiver"] is None]
    paths = [t for t in tests if t["receiver"] is not None and not t.get("receiver_inputs")]
    inputs = [t for t in tests if t.get("receiver_inputs")]
    kept = [t for t in tests if t["kept"]]
    n_kept = {k: sum(t["kept"] for t in group) for k, group in (("nodes", nodes), ("paths", paths), ("inputs", inputs))}
    section.add(f"**What same-layout sources cannot see** (`[circuit] structural`): {len(nodes)} head / MLP site(s) "
                f"whose output no same-layout source changes and {len(paths)} path(s) along which none changes a "
                f"logit were tested by zero ablation; kept where an answer's change rate has a CI low of at least the "
                f"edge threshold: {n_kept['nodes']} node(s) and {n_kept['paths']} "
                "edge(s), drawn in the circuit with no label (no same-layout test can say what they carry)." +
                (f" A head's query, key and value were tested apart {len(inputs)} time(s) (`split_inputs`), "
                 f"{n_kept['inputs']} kept." if inputs else "") +
                " Zero ablation takes the model off its inputs: a kept node says the answers need the component, "
                "not what it computes; resample evaluation leaves these constant components as they are, so the "
                "figures above do not change.")
    if kept:
        section.add(Table(["sender", "receiver", "answer", "change rate [95% CI]", "n"],
                          [[t["sender"], (t["receiver"] or "(the node itself)") +
                            (f" ({t['receiver_inputs']} only)" if t.get("receiver_inputs") else ""), t["target"],
                            _ci_text(t["effect"], (t["ci_low"], t["ci_high"])), t["n"]] for t in kept],
                          caption="Kept zero-ablation tests: structural nodes (receiver: the node itself) and edges."))


def ground_truth_section(report: Report, ctx: RunContext) -> None:
    """A compiled model's circuit beside the program's ground truth (``discovery/ground_truth.py``): node and
    edge precision / recall against what the ablation can move and against everything compiled, and the labels."""
    gt = (ctx.results.circuit or {}).get("ground_truth")
    if not gt:
        return
    s = report.section("The circuit beside the compiled program's ground truth")
    s.add(f"The model was compiled from a RASP program, so every head and MLP computes a known variable "
          f"(`ground_truth.json` beside the weights). Resample ablation from same-layout sources moves only "
          f"{', '.join(gt['visible_components']) or 'no component'}; the rest of the program is constant between "
          f"every base and its source, and is scored apart (\"full\"). Residual nodes stand for bundles and are "
          f"left out of precision and recall ({gt['bundles']} of them)." +
          (" The circuit holds the structural pass's nodes and edges (zero ablation where no same-layout source "
           "moves anything), so the \"full\" rows score what resample and zero ablation see together; against the "
           "same-layout \"visible\" truth they show as extra." if (ctx.results.circuit or {}).get("structural_tests")
           is not None else ""))
    rows = [[f"{what} ({truth})", _fmt(gt[what][truth]["precision"]), _fmt(gt[what][truth]["recall"]),
             ", ".join(gt[what][truth]["missed"]) or "–", ", ".join(gt[what][truth]["extra"]) or "–"]
            for what in ("nodes", "edges") for truth in ("visible", "full")]
    s.add(Table(["circuit against the truth", "precision", "recall", "missed", "extra"], rows))
    wrong = [r for r in gt["labels"] if not r["right"]]
    s.add(f"Verified labels that name a variable the program puts at their site: **{gt['labels_right']} of "
          f"{gt['labels_total']}**" + ("." if not wrong else "; not: " + "; ".join(
              f"{r['site']} carries {', '.join(r['features'])} (the program holds {', '.join(r['truth'])} there)"
              for r in wrong[:10]) + "."))
    aliased = [f"{r['site']}: {f} = {a}" for r in gt["labels"] for f, a in (r.get("aliases") or {}).items()]
    if aliased:
        s.add("Counted as right because the label is the same partition of every input as a variable the program "
              "holds there, at that position (no test can tell them apart): " + "; ".join(aliased[:10]) + ".")
    if gt.get("notes"):
        s.add("\n".join(f"- {note}" for note in gt["notes"]))


def claims_section(report: Report, ctx: RunContext) -> None:
    s = report.section("The paper's claims beside circuitkit's verification")
    rows = []
    for c in ctx.cfg.paper_claims:
        verdict = (ctx.results.claims or {}).get(c.get("claim", ""), "not evaluated in this run")
        rows.append([c.get("claim", ""), c.get("check", ""), verdict])
    s.add(Table(["paper's claim", "what circuitkit checks", "circuitkit's result"], rows))


def manifest_section(report: Report, manifest: dict[str, Any]) -> None:
    s = report.section("Reproducibility manifest")
    rows = [["seed", manifest["seed"]], ["git commit", manifest["git_commit"]]]
    if manifest.get("git_commit_at_start") not in (None, manifest["git_commit"]):
        rows.append(["git commit when the run started", manifest["git_commit_at_start"]])
    rows += [["python", manifest["python"]],
             ["created", manifest["created"]]]
    rows += [[f"version: {k}", v] for k, v in manifest["versions"].items()]
    cached = set(manifest.get("stages_cached", []))
    rows += [[f"stage time: {k} (s)", f"{v}{' (computed in an earlier run, reused)' if k in cached else ''}"]
             for k, v in manifest.get("stage_seconds", {}).items()]
    s.add(Table(["field", "value"], rows))
    s.add("The full configuration is in `manifest.json` next to this report.")


def build_report(ctx: RunContext, manifest: dict[str, Any]) -> Report:
    cfg = ctx.cfg
    r = ctx.results
    circ = r.circuit or {}
    headline = ""
    if (circ.get("evaluation") or {}).get("faithfulness_normalized"):
        headline = (f" Circuit faithfulness {_fmt(circ['evaluation']['faithfulness_normalized'].get('all'))}; share "
                    f"the verified labels explain {_fmt(circ.get('explained_share'))}"
                    f"{_per_answer_shares(circ)}.")
    if (r.comparison or {}).get("verdict"):
        headline += " " + verdict_text(r.comparison["verdict"]).replace("**", "")
    report = Report(f"circuitkit case study: {cfg.name}",
                    f"{cfg.description} {'Quick settings (smoke run).' if cfg.quick else 'Full settings.'}{headline}")
    if r.model is not None:
        model_section(report, r.model)
    if r.decoder is not None:
        decoder_section(report, r.decoder)
    if r.inversions is not None:
        inversion_section(report, r.inversions, ctx.work / "inversions")
    for name, builder in SECTION_BUILDERS:
        summary = getattr(r, name)
        if summary is not None:
            builder(report, summary, ctx)
    comparison_section(report, ctx)
    ground_truth_section(report, ctx)
    claims_section(report, ctx)
    manifest_section(report, manifest)
    return report


#: sections of the later stages: (result key, fn(report, result, ctx))
SECTION_BUILDERS: list[tuple[str, Any]] = [("patching", patching_section), ("groups", groups_section),
                                           ("screen", screen_section), ("circuit", circuit_section),
                                           ("comparison", baselines_section)]


def write_report(report: Report, out: Path, manifest: dict[str, Any], results: CaseResults,
                 attachments: Mapping[str, Path] | None = None) -> None:
    """index.html, report.md (+ figures/), manifest.json, results.json and the attachments ({name in the report:
    file}, e.g. the circuit's JSON/GraphML/DOT/SVG) — the directory is replaced atomically.  A ``README.md``
    already there (a person's notes on the report) is carried over: circuitkit never writes one."""
    page = render_html(report)
    md, files = render_markdown(report)
    notes = (out / "README.md").read_bytes() if (out / "README.md").is_file() else None
    with atomic_dir(out, keep_existing=False) as tmp:
        if notes is not None:
            (tmp / "README.md").write_bytes(notes)
        for name, f in (attachments or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(f.read_bytes())
        (tmp / "index.html").write_text(page)
        (tmp / "report.md").write_text(md)
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        atomic_write_json(tmp / "manifest.json", manifest)
        slim = results.to_dict(without=("inversions",))
        (tmp / "results.json").write_text(json.dumps(slim, indent=1, default=str) + "\n")
