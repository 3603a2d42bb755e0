"""Pipeline stages after the decoder: activation-patching maps and the verified circuit."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from circuitkit.errors import CircuitkitError
from circuitkit.sites import parse_site

if TYPE_CHECKING:
    from circuitkit.pipeline.run import RunContext
    from circuitkit.pipeline.stages import StageRunner

CONTRASTS = ("random", "minimal")


def _pairs(ctx: "RunContext", contrast: str, n: int) -> tuple[list[str], list[str]]:
    """n test inputs and one contrast input for each (same token length); inputs that admit no
    contrast (counting: all three counts equal) are skipped, as the paper did."""
    task = ctx.probed.task
    rng = random.Random(ctx.cfg.seed)
    test = task.split("test")
    target = ctx.cfg.patching.target or None
    bases: list[str] = []
    sources: list[str] = []
    for i in rng.sample(range(len(test)), min(len(test), 20 * n)):
        try:
            src = (task.contrast_random(test[i], rng, target) if contrast == "random"
                   else task.contrast_minimal(test[i], rng))
        except (CircuitkitError, ValueError):
            continue
        bases.append(test[i])
        sources.append(src)
        if len(bases) == n:
            break
    return bases, sources


def stage_patching(ctx: "RunContext", runner: "StageRunner") -> None:
    """Head x position and residual x position interchange sweeps for each contrast."""
    from circuitkit.patching.sweep import sweep

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

    ctx.results["patching"] = runner.run("patching", [cfg.patching.examples, cfg.patching.contrasts,
                                                      cfg.patching.target, cfg.seed], fn, depends=("model",))


def stage_screen(ctx: "RunContext", runner: "StageRunner") -> None:
    """Coverage: every decoder site at every named position (or ``[hypotheses] positions``) patched by
    aligned resampling; the pairs that change the answer go on to hypotheses and verification.
    Skipped when ``[hypotheses] sites`` lists the sites explicitly."""
    from circuitkit.inversion.train import decoder_sites
    from circuitkit.patching.screen import screen_sites

    cfg, pm = ctx.cfg, ctx.probed
    h = cfg.hypotheses
    if h.sites:
        ctx.results["screen"] = {"skipped": "[hypotheses] sites lists the sites", "kept": list(h.sites)}
        return
    sites = [parse_site(s) for s in cfg.decoder.sites] or decoder_sites(pm)
    positions = list(h.positions) or list(pm.task.position_names)

    def fn(d: Path) -> dict:
        res = screen_sites(pm, [s.at(None) for s in sites], positions, n=h.screen_examples, seed=cfg.seed,
                           threshold=h.screen_threshold, progress=ctx.progress)
        return {**res.to_dict(), "sites": [str(s) for s in sites], "positions": positions}

    ctx.results["screen"] = runner.run("screen", [[str(s) for s in sites], positions, h.screen_examples,
                                                  h.screen_threshold, cfg.seed], fn, depends=("model",))
    ctx.log(f"  screen: {len(ctx.results['screen']['kept'])} of {len(ctx.results['screen']['rows'])} "
            "site-positions change the answer")


def stage_circuit(ctx: "RunContext", runner: "StageRunner") -> None:
    """Hypotheses from decoder ε-preimages -> interchange verification with null controls ->
    circuit graph with path-patching edges -> faithfulness / completeness / minimality."""
    from circuitkit.circuit.discover import discover_circuit
    from circuitkit.circuit.export import export_all
    from circuitkit.hypotheses.preimage_sources import DecoderPreimage, PoolPreimage

    cfg, pm = ctx.cfg, ctx.probed
    h = cfg.hypotheses
    sites = [parse_site(s) for s in h.sites]
    if not sites:
        ctx.results["circuit"] = {"skipped": "no [hypotheses] sites configured"}
        return

    per_cell = h.n_per_cell or cfg.decoder.n_per_cell

    def fn(d: Path) -> dict:
        if h.source == "decoder":
            src = DecoderPreimage(ctx.decoder, n_per_cell=per_cell, seed=cfg.seed)
        else:
            src = PoolPreimage(pm, pool_size=h.pool, seed=cfg.seed)
        disc = discover_circuit(pm, sites, n_queries=h.queries, pool=h.pool, source=src, seed=cfg.seed,
                                model_name=cfg.name, n_pairs=h.pairs, eval_inputs=h.eval_inputs)
        files = export_all(disc.graph, d, "circuit", extra={"case": cfg.name})
        hyp = disc.hypotheses.to_dict() if hasattr(disc.hypotheses, "to_dict") else {}
        ver = disc.verification.to_dict()
        (d / "hypotheses.json").write_text(json.dumps(hyp, indent=1, default=str))
        (d / "verification.json").write_text(json.dumps(ver, indent=1, default=str))
        return {"source": h.source, "summary": disc.summary(), "files": {k: Path(v).name for k, v in files.items()},
                "evaluation": disc.evaluation.to_dict() if disc.evaluation else None}

    ctx.results["circuit"] = runner.run("circuit", [h.__dict__, per_cell, cfg.seed], fn,
                                        depends=("model", "decoder") if h.source == "decoder" else ("model",))


def stage_groups(ctx: "RunContext", runner: "StageRunner") -> None:
    """Cumulative group patching, forward and backward (the paper's tables), per contrast.

    Counting uses the paper's exact protocol (``circuitkit.patching.counting_table``: contrast R
    may change the length, positions aligned by name; contrast F flips one letter)."""
    from circuitkit.patching import counting_table as paper_table
    from circuitkit.patching.groups import Group, cumulative_patch, to_markdown

    cfg, pm = ctx.cfg, ctx.probed
    if not cfg.patching.groups:
        return

    def fn(d: Path) -> dict:
        n = cfg.patching.examples
        if pm.task.name == "counting":
            results = paper_table.counting_table(pm, n=n, seed=cfg.seed)
            md = paper_table.to_markdown(results, f"{cfg.name}: cumulative group patching")
            paper, found = paper_table.PAPER, paper_table.findings(results)
        else:
            groups = [Group.parse("+".join(g), g) for g in cfg.patching.groups]
            results = {}
            for contrast in cfg.patching.contrasts:
                bases, sources = _pairs(ctx, contrast, n)
                results["R" if contrast == "random" else "F"] = cumulative_patch(
                    pm, bases, sources, groups, target=cfg.patching.target or None, seed=cfg.seed)
            md = to_markdown(results, f"{cfg.name}: cumulative group patching")
            paper, found = {}, {}  # the paper's table and findings are counting's
        (d / "groups.md").write_text(md)
        return {"markdown": md, "results": {c: r.to_dict() for c, r in results.items()},
                "findings": found, "paper": paper}

    ctx.results["groups"] = runner.run("groups", [cfg.patching.groups, cfg.patching.examples,
                                                  cfg.patching.contrasts, cfg.seed], fn, depends=("model",))


def _lookup(obj: dict, path: str):
    for part in path.split("/"):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def evaluate_claims(ctx: "RunContext") -> dict[str, str]:
    """The paper's claims (config ``[[paper_claims]]``) checked against this run's results.

    kind = "verified": ``site`` (one or a list) carries ``feature`` (one or a list) among the
    verified nodes;
    kind = "finding": the value at ``path`` (``/``-separated, in the group-patching findings)
    must be true, or lie within [``min``, ``max``]."""
    out: dict[str, str] = {}
    ver = None
    vfile = ctx.work / "circuit" / "verification.json"
    if vfile.exists():
        ver = json.loads(vfile.read_text())
    for c in ctx.cfg.paper_claims:
        kind, claim = c.get("kind"), c.get("claim", "")
        if kind == "verified":
            if ver is None:
                out[claim] = "not evaluated (no verification in this run)"
                continue
            sites = c["site"] if isinstance(c["site"], list) else [c["site"]]
            feats = c["feature"] if isinstance(c["feature"], list) else [c["feature"]]
            hit = [n for n in ver["nodes"] if n["site"] in sites and set(feats) & set(n["features"])]
            out[claim] = ("holds: " + "; ".join(f"{n['site']} carries {', '.join(n['features'])} (effect {n['effect']})"
                                                for n in hit) if hit
                          else f"not verified: no verified node among {', '.join(sites)} carrying {' or '.join(feats)}")
        elif kind == "finding":
            val = _lookup(ctx.results.get("groups", {}).get("findings", {}), c["path"])
            if val is None:
                out[claim] = "not evaluated (no group patching result)"
            elif isinstance(val, bool):
                out[claim] = f"{'holds' if val else 'does not hold'} ({c['path']} = {val})"
            else:
                lo, hi = float(c.get("min", "-inf")), float(c.get("max", "inf"))
                ok = lo <= float(val) <= hi
                out[claim] = f"{'holds' if ok else 'does not hold'} ({c['path']} = {float(val):.3f}, expected [{lo}, {hi}])"
    return out


#: Wang et al. (2022) IOI head classes in GPT-2 small (layer.head)
WANG_HEAD_CLASSES: dict[str, tuple[str, ...]] = {
    "name mover": ("9.9", "9.6", "10.0"),
    "backup name mover": ("10.10", "10.6", "10.2", "10.1", "11.2", "9.7", "9.0", "11.9"),
    "negative name mover": ("10.7", "11.10"),
    "S-inhibition": ("7.3", "7.9", "8.6", "8.10"),
    "induction": ("5.5", "5.8", "5.9", "6.9"),
    "duplicate token": ("0.1", "0.10", "3.0"),
    "previous token": ("2.2", "4.11"),
}


def wang_comparison(ctx: "RunContext") -> list[list]:
    """Per Wang et al. head class: its heads, the mean head-patching effect at END (ABC contrast)
    and which of them circuitkit verified, for a GPT-2-small-shaped model."""
    pm = ctx.probed
    maps = ctx.results.get("patching", {}).get("maps", {})
    head_map = maps.get("minimal/head") or maps.get("random/head")
    ver_file = ctx.work / "circuit" / "verification.json"
    verified = {n["site"].split("@")[0] for n in json.loads(ver_file.read_text())["nodes"]} if ver_file.exists() else set()
    rows = []
    for cls, heads in WANG_HEAD_CLASSES.items():
        effects, found = [], []
        for h in heads:
            L, H = map(int, h.split("."))
            if L >= pm.n_layers or H >= pm.n_heads:
                continue
            if head_map is not None:
                import numpy as np

                mean = np.asarray(head_map["mean"])  # [layer, pos, head]
                effects.append(head_map["base_mean"] - float(mean[L, :, H].min()))
            if f"a{L}.{H}" in verified:
                found.append(h)
        rows.append([cls, ", ".join(heads), f"{max(effects):.3f}" if effects else "n/a",
                     ", ".join(found) or "none"])
    return rows
