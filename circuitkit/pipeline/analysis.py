"""Pipeline stages after the decoder: activation-patching maps and the verified circuit."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitkit.errors import CircuitkitError
from circuitkit.pipeline.outputs import CircuitSummary, GroupsSummary, PatchingSummary, ScreenSummary
from circuitkit.sites import parse_site

if TYPE_CHECKING:
    from circuitkit.pipeline.run import RunContext
    from circuitkit.pipeline.stages import StageRunner

def _pairs(ctx: RunContext, contrast: str, n: int) -> tuple[list[str], list[str]]:
    """n test inputs and one contrast input for each (same token length); inputs that admit no
    contrast (counting: all three counts equal) are skipped, as the paper did."""
    from circuitkit.patching.inputs import paired_inputs

    task, target = ctx.probed.task, ctx.cfg.patching.target or None
    return paired_inputs(task, lambda t, r: task.contrast(t, contrast, r, target), n, random.Random(ctx.cfg.seed))


def stage_patching(ctx: RunContext, runner: StageRunner) -> PatchingSummary:
    """Head x position and residual x position interchange sweeps for each contrast."""
    from circuitkit.patching.sweep import sweep
    from circuitkit.tasks.base import CONTRASTS

    cfg, pm = ctx.cfg, ctx.probed
    bad = set(cfg.patching.contrasts) - set(CONTRASTS)
    if bad:
        raise CircuitkitError(f"[patching] unknown contrasts {sorted(bad)}; valid: {', '.join(CONTRASTS)}")

    def fn(d: Path) -> dict:
        out: dict = {"target": cfg.patching.target or pm.task.default_target, "n": cfg.patching.examples, "maps": {}}
        for contrast in cfg.patching.contrasts:
            bases, sources = _pairs(ctx, contrast, cfg.patching.examples)
            for kind in ("head", "resid_pre"):
                res = sweep(pm, bases, kind, source=sources, metric="logit_diff",
                            target=cfg.patching.target or None, progress=ctx.progress, seed=cfg.seed)
                out["maps"][f"{contrast}/{kind}"] = res.to_dict(with_ci=False)
        return out

    return runner.run("patching", [cfg.patching.examples, cfg.patching.contrasts, cfg.patching.target, cfg.seed],
                      fn)  # type: ignore[return-value]


def stage_screen(ctx: RunContext, runner: StageRunner) -> ScreenSummary:
    """Coverage: every decoder site and MLP output at every named position (or ``[hypotheses] positions``) patched by
    aligned resampling; the pairs that change the answer go on to hypotheses and verification.
    Skipped when ``[hypotheses] sites`` lists the sites explicitly."""
    from circuitkit.patching.screen import screen_sites
    from circuitkit.sites import paper_sites

    cfg, pm = ctx.cfg, ctx.probed
    h = cfg.hypotheses
    if h.sites:
        return {"skipped": "[hypotheses] sites lists the sites", "kept": list(h.sites)}
    # the decoder's sites, plus the MLP outputs the paper does not decode for multi-head models (their
    # hypotheses come from exact pool preimages)
    mlps = [x for x in paper_sites(pm.n_layers, pm.n_heads, include_mlp=True) if x.kind == "mlp_out"]
    decoded = [parse_site(s).at(None) for s in cfg.decoder.sites]
    sites = list(dict.fromkeys(decoded + mlps)) if decoded else paper_sites(pm.n_layers, pm.n_heads, include_mlp=True)
    positions = list(h.positions) or list(pm.task.position_names)

    def fn(d: Path) -> dict:
        res = screen_sites(pm, [s.at(None) for s in sites], positions, n=h.screen_examples, seed=cfg.seed,
                           threshold=h.screen_threshold, progress=ctx.progress)
        return {**res.to_dict(), "sites": [str(s) for s in sites], "positions": positions}

    summary: ScreenSummary = runner.run("screen", [[str(s) for s in sites], positions, h.screen_examples,
                                                   h.screen_threshold, cfg.seed], fn)  # type: ignore[assignment]
    ctx.log(f"  screen: {len(summary['kept'])} of {len(summary['rows'])} site-positions change the answer")
    return summary


def claimed_pairs(claims: list[dict]) -> list[tuple[str, str]]:
    """(site, feature) of every ``kind = "verified"`` claim in a case config: pre-registered hypotheses the
    verifier tests directly, beside those the preimages suggest (group sites are tested one by one)."""
    out: list[tuple[str, str]] = []
    for c in claims:
        if c.get("kind") != "verified":
            continue
        sites = c["site"] if isinstance(c["site"], list) else [c["site"]]
        feats = c["feature"] if isinstance(c["feature"], list) else [c["feature"]]
        out += [(s, f) for s in sites for f in feats if (s, f) not in out]
    return out


#: bumped when the circuit stage's summary gains a field later stages read (2: ``verified_nodes``; 3:
#: ``structural_tests``; 4: the structural pass's embedding senders and input completion), so that a summary
#: cached by older code is recomputed rather than read without it
CIRCUIT_SUMMARY_VERSION = 4


def stage_circuit(ctx: RunContext, runner: StageRunner) -> CircuitSummary:
    """Hypotheses from decoder ε-preimages (exact pool preimages at sites the decoder does not decode)
    at the screened sites -> interchange verification on fair pairs with null controls -> circuit
    growth to the faithfulness target -> graph with path-patching edges -> node- and edge-level
    faithfulness, CPR/CMD curves, completeness and minimality."""
    from circuitkit.circuit.discover import CircuitSettings, discover_circuit
    from circuitkit.circuit.export import export_all
    from circuitkit.discovery.ground_truth import ground_truth_of_run
    from circuitkit.hypotheses.preimage_sources import DecoderPreimage, PoolPreimage, RoutedPreimage

    cfg, pm = ctx.cfg, ctx.probed
    h, c = cfg.hypotheses, cfg.circuit
    names = list(h.sites) or list((ctx.results.screen or {}).get("kept", []))
    sites = [parse_site(s) for s in names]
    if not sites:
        return {"skipped": "no site changes the answer under aligned resampling (screen) and no [hypotheses] sites "
                           "are configured"}
    per_cell = h.n_per_cell or cfg.decoder.n_per_cell
    claims = claimed_pairs(cfg.paper_claims)
    settings = CircuitSettings(target=c.target, min_edge=c.min_edge, edge_pairs=c.edge_pairs,
                               eval_inputs=h.eval_inputs, completeness_subsets=c.completeness_subsets,
                               structural=c.structural, split_inputs=c.split_inputs)

    def fn(d: Path) -> dict:
        pool = PoolPreimage(pm, pool_size=h.pool, seed=cfg.seed)
        if h.source == "decoder":
            decoded = (ctx.results.decoder or {}).get("sites") or []
            src = RoutedPreimage(DecoderPreimage(ctx.decoder, n_per_cell=per_cell, seed=cfg.seed), pool, decoded)
        else:
            src = pool
        disc = discover_circuit(pm, sites, n_queries=h.queries, pool=h.pool, source=src, seed=cfg.seed,
                                model_name=cfg.name, n_pairs=h.pairs, n_inputs=h.verify_inputs,
                                eval_inputs=h.eval_inputs, settings=settings,
                                progress=ctx.progress, claims=claims)
        ev = disc.evaluation.to_dict() if disc.evaluation else None
        edge_tests = disc.graph.graph.pop("edge_tests", [])
        structural_tests = disc.graph.graph.pop("structural_tests", None)
        # the verified nodes alone (growth's first step): what "the whole story" claims are judged on
        verified_only = disc.growth.steps[0]["faithfulness"] if disc.growth and disc.growth.steps else None
        extra = {"case": cfg.name, "evaluation": ev, "edge_evaluation": disc.edge_evaluation,
                 "explained_share": disc.explained_share, "verified_faithfulness": verified_only,
                 "explained_share_per_answer": disc.explained_shares,
                 "explained_share_answer_level": disc.answer_level_shares,
                 "loop": disc.loop.to_dict() if disc.loop else None, "edge_tests": edge_tests,
                 "structural_tests": structural_tests,
                 "growth": disc.growth.to_dict() if disc.growth else None,
                 "curve": disc.curve.to_dict() if disc.curve else None}
        files = export_all(disc.graph, d, "circuit", extra=extra)
        exported = json.loads(Path(files["json"]).read_text()) if "json" in files else {}
        truth = ground_truth_of_run(pm, exported.get("nodes", []), exported.get("edges", []), seed=cfg.seed)
        hyp = disc.hypotheses.to_dict()
        hyp["preimage_source_by_site"] = getattr(src, "used", {str(s): src.name for s in sites})
        ver = disc.verification.to_dict()
        (d / "hypotheses.json").write_text(json.dumps(hyp, indent=1, default=str))
        (d / "verification.json").write_text(json.dumps(ver, indent=1, default=str))
        return {"source": h.source, "sites": [str(s) for s in sites], "summary": disc.summary(),
                "files": {k: Path(v).name for k, v in files.items()}, "evaluation": ev,
                "edge_evaluation": disc.edge_evaluation, "growth": disc.growth.to_dict() if disc.growth else None,
                "curve": disc.curve.to_dict() if disc.curve else None, "explained_share": disc.explained_share,
                "verified_faithfulness": verified_only, "explained_share_per_answer": disc.explained_shares,
                "explained_share_answer_level": disc.answer_level_shares,
                "loop": disc.loop.to_dict() if disc.loop else None, "edge_tests": edge_tests,
                "structural_tests": structural_tests,
                "random_model": ver["settings"].get("random_model"), "verified_nodes": ver["nodes"],
                "ground_truth": truth.to_dict() if truth is not None else None}

    depends = ("model", "decoder") if h.source == "decoder" else ("model",)
    if "screen" in runner.keys:
        depends += ("screen",)
    return runner.run("circuit", [h.__dict__, c.__dict__, per_cell, cfg.seed, names, claims,  # type: ignore[return-value]
                                  CIRCUIT_SUMMARY_VERSION], fn, depends=depends)


def stage_groups(ctx: RunContext, runner: StageRunner) -> GroupsSummary | None:
    """Cumulative group patching, forward and backward (the paper's tables), per contrast; a task whose paper
    used its own protocol (``circuitkit.paper.protocols``: counting's) gets that one."""
    from circuitkit.paper.protocols import GroupTable, paper_protocol
    from circuitkit.patching.groups import Group, cumulative_patch, to_markdown

    cfg, pm = ctx.cfg, ctx.probed
    if not cfg.patching.groups:
        return None
    paper_table = paper_protocol(pm.task.name).group_table

    def generic(n: int, title: str) -> GroupTable:
        groups = [Group.parse("+".join(g), g) for g in cfg.patching.groups]
        results = {}
        for contrast in cfg.patching.contrasts:
            bases, sources = _pairs(ctx, contrast, n)
            results["R" if contrast == "random" else "F"] = cumulative_patch(
                pm, bases, sources, groups, target=cfg.patching.target or None, seed=cfg.seed)
        return GroupTable(results, to_markdown(results, title), {}, {})

    def fn(d: Path) -> dict:
        title = f"{cfg.name}: cumulative group patching"
        table = (paper_table(pm, cfg.patching.examples, cfg.seed, title) if paper_table
                 else generic(cfg.patching.examples, title))
        (d / "groups.md").write_text(table.markdown)
        return {"markdown": table.markdown, "results": {c: r.to_dict() for c, r in table.results.items()},
                "findings": table.findings, "paper": table.paper}

    return runner.run("groups", [cfg.patching.groups, cfg.patching.examples, cfg.patching.contrasts,  # type: ignore[return-value]
                                 cfg.seed], fn)


def _lookup(obj: dict, path: str):
    for part in path.split("/"):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _carrier_texts(nodes: list[dict[str, Any]]) -> list[str]:
    """"SITE carries F (IIA, effect)" once per verified claim: a site group is one entry, its members joined.  A
    group that is another entry's group plus one component (a component joining a carrier:
    ``verification/report.py``) is named after it, "joined by X (IIA ...)", not as an entry of its own."""
    seen: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
    for n in nodes:
        seen.setdefault((tuple(n.get("group") or [n["site"]]), tuple(n["features"])), n)
    joins: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {key: [] for key in seen}
    for (sites, feats), n in seen.items():
        if len(sites) > 1 and (sites[:-1], feats) in seen:
            joins[(sites[:-1], feats)].append(f"{sites[-1]} (IIA {n['iia']})")
            del joins[(sites, feats)]
    return [f"{' + '.join(sites)}{' (site group)' if len(sites) > 1 else ''} carries {', '.join(feats)} "
            f"(IIA {seen[(sites, feats)]['iia']}, effect {seen[(sites, feats)]['effect']})"
            + (f", joined by {' and '.join(joined)}" if joined else "") for (sites, feats), joined in joins.items()]


def stage_claims(ctx: RunContext, runner: StageRunner) -> dict[str, str]:
    """The claims stage: ``evaluate_claims`` on this run's results (cheap, never cached)."""
    return evaluate_claims(ctx)


def evaluate_claims(ctx: RunContext) -> dict[str, str]:
    """The paper's claims (config ``[[paper_claims]]``) checked against this run's results.

    kind = "verified": ``site`` (one or a list) carries ``feature`` (one or a list) among the *learned*
    verified nodes verified on the answer (architectural ones and logit-level ones never count), with IIA >=
    ``min_iia`` if given; ``all_sites =
    true`` demands every listed site;
    kind = "finding": the value at ``path`` (``/``-separated, in the group-patching findings)
    must be true, or lie within [``min``, ``max``];
    kind = "circuit": the same for a value in the circuit stage's results (e.g.
    ``evaluation/faithfulness_normalized/all``, or ``verified_faithfulness/all``: the verified nodes alone);
    ``path`` may be a list, every value of which must hold (an undefined one does not)."""
    out: dict[str, str] = {}
    nodes = (ctx.results.circuit or {}).get("verified_nodes")
    for c in ctx.cfg.paper_claims:
        kind, claim = c.get("kind"), c.get("claim", "")
        if kind == "verified":
            if nodes is None:
                out[claim] = "not evaluated (no verification in this run)"
                continue
            sites = c["site"] if isinstance(c["site"], list) else [c["site"]]
            feats = c["feature"] if isinstance(c["feature"], list) else [c["feature"]]
            min_iia = float(c.get("min_iia", 0.0))
            hit = [n for n in nodes if n["site"] in sites and set(feats) & set(n["features"])
                   and not n.get("architectural") and n.get("level", "answer") == "answer"
                   and (n.get("iia") or 0.0) >= min_iia]
            found = {n["site"] for n in hit}
            ok = found >= set(sites) if c.get("all_sites") else bool(found)
            iia_txt = f" with IIA >= {min_iia}" if min_iia else ""
            out[claim] = ("holds: " + "; ".join(_carrier_texts(hit)) if ok
                          else f"not verified: no learned verified node among {', '.join(sorted(set(sites) - found))} "
                               f"carrying {' or '.join(feats)}{iia_txt}")
        elif kind in ("finding", "circuit"):
            src = (ctx.results.groups or {}).get("findings", {}) if kind == "finding" else (ctx.results.circuit or {})
            paths = c["path"] if isinstance(c["path"], list) else [c["path"]]  # a list: every value must hold
            lo, hi = float(c.get("min", "-inf")), float(c.get("max", "inf"))
            parts, verdicts = [], []
            for path in paths:
                val = _lookup(src, path)
                if val is None or (isinstance(val, float) and val != val):
                    parts.append(f"{path} = undefined")
                    verdicts.append(None)
                elif isinstance(val, bool):
                    parts.append(f"{path} = {val}")
                    verdicts.append(val)
                else:
                    parts.append(f"{path} = {float(val):.3f}")
                    verdicts.append(lo <= float(val) <= hi)
            expected = "" if all(isinstance(_lookup(src, p), bool) for p in paths) else f", expected [{lo}, {hi}]"
            if all(v is None for v in verdicts):
                out[claim] = f"not evaluated (no {'group patching' if kind == 'finding' else 'circuit'} result)"
            else:
                ok = all(v is True for v in verdicts)
                out[claim] = f"{'holds' if ok else 'does not hold'} ({'; '.join(parts)}{expected})"
    return out
