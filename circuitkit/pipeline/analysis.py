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

    def fn(d: Path) -> dict:
        if h.source == "decoder":
            src = DecoderPreimage(ctx.decoder, n_per_cell=cfg.decoder.n_per_cell, seed=cfg.seed)
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

    ctx.results["circuit"] = runner.run("circuit", [h.__dict__, cfg.decoder.n_per_cell, cfg.seed], fn,
                                        depends=("model", "decoder") if h.source == "decoder" else ("model",))
