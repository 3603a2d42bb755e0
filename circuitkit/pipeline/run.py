"""``circuitkit run CASE``: model -> decoder -> inversions -> patching -> hypotheses ->
verification -> circuit -> report, each stage cached in the work directory (``runs/CASE``)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitkit.errors import CircuitkitError
from circuitkit.manifest import build_manifest, git_commit
from circuitkit.models.checkpoint import ProbedModel, load_probed
from circuitkit.models.local_gpt2 import find_gpt2_small, missing_message
from circuitkit.pipeline.analysis import stage_circuit, stage_claims, stage_groups, stage_patching, stage_screen
from circuitkit.pipeline.comparison import stage_comparison
from circuitkit.pipeline.config import CaseConfig, repo_relative
from circuitkit.pipeline.outputs import CaseResults, DecoderSummary, InversionsSummary, ModelSummary
from circuitkit.pipeline.stages import Stage, StageRunner, remove_orphans, stage_order
from circuitkit.seeding import seed_everything
from circuitkit.sites import Site, parse_site

if TYPE_CHECKING:
    from circuitkit.inversion.train import DecoderTrainConfig


@dataclasses.dataclass
class RunContext:
    """Everything a stage needs: the config, where artifacts go, and the loaded objects."""

    cfg: CaseConfig
    work: Path  # stage cache directory
    device: str
    progress: bool
    log: Callable[[str], None]
    probed: ProbedModel | None = None
    decoder: Any = None
    results: CaseResults = dataclasses.field(default_factory=CaseResults)


# ---- stages -----------------------------------------------------------------------------------
def stage_model(ctx: RunContext, runner: StageRunner) -> ModelSummary:
    from circuitkit.models.evaluate import evaluate_model
    from circuitkit.models.train import default_config, train_probed
    from circuitkit.tasks.registry import task_identity

    cfg = ctx.cfg
    task = cfg.load_task()
    m = cfg.model
    if m.source == "gpt2":
        gpt2 = find_gpt2_small(m.path or None)
        if gpt2 is None and m.fallback_path:
            ctx.log(f"  {missing_message(m.path or None)} Running on the model trained here, {m.fallback_path}, instead.")
            m = dataclasses.replace(m, source="path", path=m.fallback_path)
        elif gpt2 is None:
            ctx.log(f"  {missing_message(m.path or None)} Running on a model trained here instead.")
        else:
            task = task.with_pretrained_tokenizer(gpt2)
            m = dataclasses.replace(m, source="path", path=str(gpt2))
    if m.source == "path":
        src = cfg.resolve(m.path)

        ctx.probed = pm = load_probed(src, task=task, device=ctx.device)

        def fn(d: Path) -> dict:
            res = evaluate_model(pm.runner, task, "test", limit=2000 if cfg.quick else 20000, progress=ctx.progress)
            (d / "source.txt").write_text(repo_relative(src))
            return {"source": repo_relative(src), "metrics": res}

        from circuitkit.inversion.checkpoint import model_hash

        # keyed by the weights, not the path: a model retrained in place is not mistaken for the old one, and the
        # same model reached by another path (a checkout or an installed wheel) reuses the stage
        summary = runner.run("model", {"weights_sha256": model_hash(pm), "quick": cfg.quick,
                                       "task": task.describe(), "task_ref": task_identity(task)}, fn)
    else:
        tcfg = default_config(task).replace(
            steps=m.steps or None, n_layer=m.n_layer or None, n_head=m.n_head or None, d_model=m.d_model or None,
            batch_size=m.batch_size or None, lr=m.lr or None, seed=cfg.seed,
            eval_limit=2000 if cfg.quick else 20000)

        def fn(d: Path) -> dict:
            metrics = train_probed(task, d / "checkpoint", tcfg, progress=ctx.progress, device=ctx.device,
                                   partial=runner.scratch("model"))
            return {"source": "trained here", "metrics": metrics, "config": dataclasses.asdict(tcfg)}

        summary = runner.run("model", {**dataclasses.asdict(tcfg), "task_ref": task_identity(task)}, fn)
        ctx.probed = load_probed(runner.path("model") / "checkpoint", task=task, device=ctx.device)
    acc = summary["metrics"]["accuracy"]
    ctx.log(f"  probed model: {summary['metrics']['metric']} = {acc:.4f}")
    return summary  # type: ignore[return-value]


def decoder_train_config(cfg: CaseConfig) -> DecoderTrainConfig:
    """The trainer's options from a case's ``[decoder]`` section (0 keeps the trainer's default)."""
    from circuitkit.inversion.train import DecoderTrainConfig

    dc = cfg.decoder
    dcfg = DecoderTrainConfig().replace(
        minutes=dc.minutes, seed=cfg.seed, steps=dc.steps or 10**9, d_model=dc.d_model or None,
        cond_mid=2 * dc.d_model if dc.d_model else None,  # the conditioning MLP scales with the width, as in the paper's 256/512
        batch_size=dc.batch_size or None, lr=dc.lr or None, final_eval_queries=dc.eval_queries,
        final_eval_per_cell=dc.eval_per_cell, n_slots=dc.n_slots, mixed_sites=dc.mixed_sites,
        rebalance_floor=dc.rebalance_floor, compile=dc.compile, eval_every=dc.rebalance_every or None,
        eval_queries=dc.rebalance_queries or None, eval_per_cell=dc.rebalance_per_cell or None,
        eval_window=dc.rebalance_window or None, length_groups=dc.length_groups or None)
    if cfg.quick:
        dcfg = dcfg.replace(eval_every=100, eval_queries=8, checkpoint_every=20)  # a killed quick run resumes too
    return dcfg


def stage_decoder(ctx: RunContext, runner: StageRunner) -> DecoderSummary:
    from circuitkit.inversion.checkpoint import load_decoder
    from circuitkit.inversion.train import decoder_sites, train_decoder

    cfg, pm = ctx.cfg, ctx.probed
    assert pm is not None
    sites = [parse_site(s) for s in cfg.decoder.sites] or decoder_sites(pm)
    if cfg.decoder.path:
        return stage_decoder_from_path(ctx, runner, sites)
    dcfg = decoder_train_config(cfg)

    def fn(d: Path) -> dict:
        res = train_decoder(pm, d / "decoder", dcfg, sites=sites, progress=ctx.progress, device=ctx.device,
                            partial=runner.scratch("decoder"))
        if res.get("resumed_from_step") is not None:
            ctx.log(f"  decoder: resumed an interrupted training from step {res['resumed_from_step']}")
        return {"sites": [str(s) for s in sites], "eval": res.get("eval", {}), "curve": res.get("history", []),
                "steps": res.get("steps"), "train_minutes": res.get("train_minutes"),
                "config": dataclasses.asdict(dcfg)}

    summary = runner.run("decoder", [dataclasses.asdict(dcfg), [str(s) for s in sites]], fn)
    ctx.decoder = load_decoder(runner.path("decoder") / "decoder", pm, device=ctx.device)
    return summary  # type: ignore[return-value]


def stage_decoder_from_path(ctx: RunContext, runner: StageRunner, sites: list[Site]) -> DecoderSummary:
    """Use the decoder at ``[decoder] path`` (checked against the probed model), evaluate its hit rate."""
    from circuitkit.inversion.checkpoint import load_decoder
    from circuitkit.inversion.evaluate import evaluate_decoder

    pm, dc = ctx.probed, ctx.cfg.decoder
    assert pm is not None
    src = ctx.cfg.resolve(dc.path)
    td = load_decoder(src, pm, device=ctx.device)
    for s in sites:
        td.site_index(s)  # a clear error for a site the decoder was not trained on
    ctx.decoder = td

    def fn(d: Path) -> dict:
        read = lambda name: json.loads((src / name).read_text()) if (src / name).exists() else {}  # noqa: E731
        res = evaluate_decoder(td.decoder, pm, sites, n_queries=dc.eval_queries, n_per_cell=dc.eval_per_cell)
        trained = read("metrics.json")
        return {"sites": [str(s) for s in sites], "eval": res, "source": str(src), "steps": trained.get("steps"),
                "train_minutes": trained.get("train_minutes"), "curve": read("train_history.json") or [],
                "trained_by": read("manifest.json") or None}

    key = {"path": str(src), "sites": [str(s) for s in sites], "eval_queries": dc.eval_queries,
           "eval_per_cell": dc.eval_per_cell, "weights_mtime": max(p.stat().st_mtime for p in src.iterdir())}
    summary = runner.run("decoder", key, fn)
    ctx.log(f"  decoder: {src} (not retrained)")
    return summary  # type: ignore[return-value]


def stage_inversions(ctx: RunContext, runner: StageRunner) -> InversionsSummary:
    from circuitkit.inversion.colour import token_colours
    from circuitkit.inversion.preimage import invert_text
    from circuitkit.inversion.render import render_html

    cfg, td = ctx.cfg, ctx.decoder
    queries = [q.split("|", 1) for q in cfg.inversion.queries]
    for q in queries:
        if len(q) != 2:
            raise CircuitkitError(f"[inversion] queries entries look like 'SITE@POS|TEXT', got {'|'.join(q)!r}")

    def fn(d: Path) -> dict:
        panels = []
        for i, (site, text) in enumerate(queries):
            inv = invert_text(td, site, text, n_per_cell=cfg.decoder.n_per_cell, seed=cfg.seed)
            rows = inv.display(100)
            colours = token_colours(td, inv.site, inv.ids, inv.query)
            page = render_html(inv, rows, colours, ctx.probed.task.tokenizer, ctx.probed.task.vocab.pad)
            (d / f"panel_{i}.html").write_text(page)
            panels.append({"site": site, "input": text, "n_samples": len(inv.texts),
                           "in_eps": int(inv.in_eps.sum()), "rows": rows[:100], "file": f"panel_{i}.html"})
        return {"panels": panels}

    return runner.run("inversions", [cfg.inversion.queries, cfg.decoder.n_per_cell, cfg.seed], fn)  # type: ignore[return-value]


#: the case study's stages: each names the stages whose results it reads (its cache key includes theirs); the
#: run order is resolved from these (``stage_order``)
STAGES: list[Stage] = [
    Stage("model", (), stage_model),
    Stage("decoder", ("model",), stage_decoder),
    Stage("inversions", ("decoder",), stage_inversions),
    Stage("patching", ("model",), stage_patching),
    Stage("groups", ("model",), stage_groups),
    Stage("screen", ("model",), stage_screen),
    Stage("circuit", ("model", "decoder", "screen"), stage_circuit),
    Stage("comparison", ("model", "circuit"), stage_comparison),
    Stage("claims", ("groups", "circuit"), stage_claims),
]


def report_attachments(work: Path) -> dict[str, Path]:
    """Stage files that travel with the report, by their name there: the circuit's exports, and the side-by-side
    comparison (its JSON, table, plot and every method's MIB circuit file) under ``comparison/``."""
    out = {f.name: f for f in sorted((work / "circuit").glob("circuit.*"))}
    cmp = work / "comparison"
    for f in sorted(cmp.rglob("*")) if cmp.is_dir() else []:
        if f.is_file() and f.name != "stage.json":
            out[f"comparison/{f.relative_to(cmp).as_posix()}"] = f
    return out


@contextlib.contextmanager
def work_lock(work: Path) -> Iterator[None]:
    """Hold ``work/.lock`` for the whole run: a second run on the same work directory is refused at once
    (the lock is the OS's, so a killed run releases it)."""
    from filelock import FileLock, Timeout

    work.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(work / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CircuitkitError(f"another 'circuitkit run' is using the work directory {str(work)!r} (it holds "
                              f"{str(work / '.lock')!r}); wait for it to finish, or pass another --work") from None
    try:
        yield
    finally:
        lock.release()


def run_case(cfg: CaseConfig, out: Path, work: Path, device: str = "cpu", progress: bool = True,
             log: Callable[[str], None] = print, threads: int | None = None) -> dict[str, Any]:
    """Run every stage (reusing cached ones under ``work``) and write the report to ``out``."""
    from circuitkit.pipeline.report import build_report, write_report
    from circuitkit.threads import apply, choose_threads

    if device != "cpu" and threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    commit_at_start = git_commit()  # the code the stages ran with (the manifest's commit is taken at the end)
    ctx = RunContext(cfg, work, device, progress, log)
    runner = StageRunner(work, log=log, needs={s.name: s.needs for s in STAGES})
    t0 = time.perf_counter()
    with work_lock(work):
        removed = remove_orphans(work)
        if removed:
            log(f"removed {len(removed)} temporary item(s) an interrupted run left behind: {', '.join(removed[:4])}")
        chosen: dict[str, dict[str, Any]] = {}
        for stage in stage_order(STAGES):
            if device == "cpu":  # the CPUs other jobs leave free, re-read before each stage (threads.py)
                chosen[stage.name] = apply(choose_threads(threads)).to_dict()
            ctx.results.set(stage.name, stage.run(ctx, runner))
        manifest = build_manifest("case_study", cfg.seed, cfg.to_dict(), threads_by_stage=chosen,
                                  stage_seconds={k: round(v, 1) for k, v in runner.timings.items()},
                                  stages_cached=runner.cached, git_commit_at_start=commit_at_start,
                                  decoder_steps_taken=(ctx.results.decoder or {}).get("steps"))
        report = build_report(ctx, manifest)
        write_report(report, out, manifest, ctx.results, report_attachments(work))
    total = time.perf_counter() - t0
    log(f"report written to {out / 'index.html'} and {out / 'report.md'} ({total:.0f} s)")
    return {"out": str(out), "seconds": round(total, 1), "stages": runner.timings, "cached": runner.cached,
            "results": _brief(ctx.results)}


def _brief(results: CaseResults) -> dict[str, Any]:
    """A JSON-able digest of the results for --json (no sample lists)."""
    return json.loads(json.dumps(results.to_dict(without=("inversions",)), default=str))
