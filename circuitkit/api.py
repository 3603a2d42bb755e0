"""The Python API: ``import circuitkit as ck``.  One documented function per step of the workflow, each
returning a typed result (a dataclass with ``to_dict()`` / ``to_json()``), and the same defaults and
checks as the command line, which calls the same code.

    pm = ck.load_model("case_studies/models/addition")              # task read from the checkpoint
    hyps = ck.hypothesize(pm, ["a0.0", "a1.1", "m0"], positions=["=", "A1"])
    ver = ck.verify(pm, hyps)                                        # fair interchange + null controls
    circuit = ck.build_circuit(pm, ver)                              # growth, edges, faithfulness
    circuit.save("runs/addition_circuit")
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circuitkit.circuit.discover import Circuit, CircuitSettings, assemble_circuit, make_circuit
from circuitkit.errors import CircuitkitError
from circuitkit.hypotheses.records import Hypothesis, HypothesisReport, Thresholds
from circuitkit.inversion.checkpoint import TrainedDecoder
from circuitkit.inversion.preimage import Inversion
from circuitkit.models.checkpoint import ProbedModel, load_probed
from circuitkit.patching.node import NodePatchResult
from circuitkit.patching.sweep import SweepResult
from circuitkit.pipeline.config import CaseConfig
from circuitkit.results import JsonResult
from circuitkit.sites import Site, parse_site
from circuitkit.tasks import Task
from circuitkit.verification.interchange import InterchangeVerifier, VerifyThresholds
from circuitkit.verification.report import VerificationReport


# ---- loading -----------------------------------------------------------------------------------
def load_model(path: str | Path, task: str | Task | None = None, device: str = "cpu") -> ProbedModel:
    """A probed model from a local checkpoint directory; its task from ``task`` (a Task or a spec such as
    ``"addition"`` or ``"my_task.py:MyTask"``), else from the checkpoint's record."""
    return load_probed(path, task=task, device=device)


def load_task(spec: str) -> Task:
    """A task by name (built-in or installed plug-in), ``path/file.py:Class`` or ``package.module:Class``."""
    from circuitkit.tasks.registry import load_task as _load

    return _load(spec)


def load_case(name_or_path: str, quick: bool = False) -> CaseConfig:
    """A case study's configuration (``counting``, ``addition``, ``ioi`` or a path to a TOML file)."""
    from circuitkit.pipeline.config import load_case as _load

    return _load(name_or_path, quick=quick)


def load_decoder(path: str | Path, model: ProbedModel | str | Path | None = None, device: str = "cpu") -> TrainedDecoder:
    """A trained InversionView decoder (checked against its probed model: ``model``, else the one it records)."""
    from circuitkit.inversion.checkpoint import check_decoder_dir, load_checked_decoder
    from circuitkit.inversion.checkpoint import load_decoder as _load

    if isinstance(model, ProbedModel):

        check_decoder_dir(path)
        return _load(path, probed=model, device=device)
    return load_checked_decoder(str(path), None if model is None else str(model), device=device)


# ---- patching ----------------------------------------------------------------------------------
def patch(model: ProbedModel, sites: Sequence[str | Site], base: Sequence[str] | None = None,
          source: Sequence[str] | None = None, n: int = 200, contrast: str = "random",
          ablation: str = "interchange", metric: str = "logit_diff", target: str | None = None,
          seed: int = 0) -> NodePatchResult:
    """Patch ``sites`` together (``a1.0@:``; no position = every position) into ``n`` test inputs (or
    ``base``), with values from ``source`` or the ``contrast`` of each base; clean vs patched metric, CIs."""
    from circuitkit.patching.inputs import bases_and_sources, reference_inputs
    from circuitkit.patching.node import patch_nodes

    bases, sources = bases_and_sources(model.task, base, source, n, contrast, seed, ablation == "interchange")
    ref = reference_inputs(model.task, len(bases), ablation, seed)
    return patch_nodes(model, bases, list(sites), ablation, sources, ref, metric, target, seed)


def sweep(model: ProbedModel, kind: str = "head", base: Sequence[str] | None = None,
          source: Sequence[str] | None = None, n: int = 200, contrast: str = "random",
          ablation: str = "interchange", metric: str = "logit_diff", target: str | None = None,
          seed: int = 0, progress: bool = False) -> SweepResult:
    """Patch every cell of ``kind`` (``head``, ``resid_pre``, ``mlp_out``, ``attn_out`` ...: layers x positions
    [x heads]) alone; the effect of each is ``base - values`` per example."""
    from circuitkit.patching.inputs import bases_and_sources, reference_inputs
    from circuitkit.patching.sweep import sweep as _sweep

    bases, sources = bases_and_sources(model.task, base, source, n, contrast, seed, ablation == "interchange")
    ref = reference_inputs(model.task, len(bases), ablation, seed)
    return _sweep(model, bases, kind, sources, ablation, ref, metric, target, seed=seed, progress=progress)


# ---- InversionView -----------------------------------------------------------------------------
def train_decoder(model: ProbedModel, out: str | Path, sites: Sequence[str | Site] | None = None,
                  progress: bool = True, device: str = "cpu", **options: Any) -> TrainedDecoder:
    """Train one InversionView decoder for ``sites`` (default: the paper's) and load it from ``out``.
    ``options`` are ``DecoderTrainConfig`` fields (``steps``, ``minutes``, ``d_model``, ``batch_size`` ...)."""
    from circuitkit.inversion.checkpoint import load_decoder as _load
    from circuitkit.inversion.train import DecoderTrainConfig
    from circuitkit.inversion.train import train_decoder as _train

    cfg = DecoderTrainConfig().replace(**options)
    site_objs = None if sites is None else [parse_site(s) if isinstance(s, str) else s for s in sites]
    _train(model, out, cfg, sites=site_objs, progress=progress, device=device)
    return _load(out, probed=model, device=device)


def invert(decoder: TrainedDecoder, site: str | Site, text: str, n_per_cell: int = 256) -> Inversion:
    """Sample the ε-preimage of ``site``'s activation on ``text`` (the paper's temperature/noise grid, every
    sample re-run through the probed model and sorted by distance)."""
    from circuitkit.inversion.preimage import invert_text

    decoder.probed.task.check_input(text)
    return invert_text(decoder, site, text, n_per_cell=n_per_cell)


# ---- hypotheses, verification, circuit ---------------------------------------------------------
def _sites(model: ProbedModel, sites: Sequence[str | Site] | None, positions: Sequence[str] | None) -> list[Site]:
    from circuitkit.sites import expand_sites

    text = None if sites is None else ",".join(str(s) for s in sites)
    return expand_sites(text, None if positions is None else ",".join(str(p) for p in positions), model)


def hypothesize(model: ProbedModel, sites: Sequence[str | Site] | None = None,
                positions: Sequence[str] | None = None, queries: int = 60, source: str = "pool",
                decoder: TrainedDecoder | None = None, pool: int = 20000, per_cell: int = 256,
                eps: float = 0.1, thresholds: Thresholds | None = None, seed: int = 0) -> HypothesisReport:
    """Rank hypotheses "site@pos carries feature f" from ε-preimages of ``queries`` test inputs: exact pool
    preimages (``source="pool"``) or InversionView samples (``source="decoder"``, with ``decoder``)."""
    from circuitkit.hypotheses.preimage_sources import DecoderPreimage, PoolPreimage
    from circuitkit.hypotheses.scoring import generate_hypotheses

    if source == "decoder":
        if decoder is None:
            raise CircuitkitError("source='decoder' needs decoder=ck.load_decoder(...) or ck.train_decoder(...)")
        src: Any = DecoderPreimage(decoder, n_per_cell=per_cell, eps=eps, seed=seed)
    elif source == "pool":
        src = PoolPreimage(model, pool_size=pool, eps=eps, seed=seed)
    else:
        raise CircuitkitError(f"unknown preimage source {source!r}; valid: pool, decoder")
    test = list(model.task.split("test"))
    picked = random.Random(seed).sample(test, min(queries, len(test)))
    return generate_hypotheses(model, _sites(model, sites, positions), picked, src, thresholds=thresholds,
                               seed=seed, model_name=str(model.path or ""))


def verify(model: ProbedModel, hypotheses: HypothesisReport | Sequence[Hypothesis] = (),
           claims: Sequence[tuple[str, str]] = (), inputs: int = 3000, pairs: int = 200,
           thresholds: VerifyThresholds | None = None, controls: bool = True, max_group: int = 12,
           seed: int = 0, progress: bool = False) -> VerificationReport:
    """Test each accepted hypothesis (and each pre-registered ``(site, feature)`` claim) by interchange on
    fair pairs, with IIA required, site groups and joint features, and the null controls beside them."""
    from circuitkit.verification.report import verify_hypotheses

    hyps = hypotheses.hypotheses if isinstance(hypotheses, HypothesisReport) else list(hypotheses)
    ver = InterchangeVerifier(model, n_inputs=inputs, n_pairs=pairs, thresholds=thresholds, seed=seed)
    for site, feature in claims:
        if parse_site(site).position is None:
            raise CircuitkitError(f"claim site {site!r} needs a position, e.g. {site}@{model.task.position_names[-1]}")
        if feature not in ver.features:
            raise CircuitkitError(f"unknown feature {feature!r}; e.g. {', '.join(list(ver.features)[:12])} ...")
    return verify_hypotheses(ver, hyps, controls=controls, null_seed=seed, model_name=str(model.path or ""),
                             max_group=max_group, progress=progress, claims=claims)


def build_circuit(model: ProbedModel, verification: VerificationReport, target: float = 0.9,
                  min_edge: float = 0.1, edge_pairs: int = 150, eval_inputs: int = 1000, inputs: int = 3000,
                  seed: int = 0, progress: bool = False) -> Circuit:
    """Grow the verified nodes to normalised faithfulness ``target``, test edges by path patching, and
    evaluate (faithfulness with CIs, completeness, minimality, CPR/CMD)."""
    settings = CircuitSettings(target=target, min_edge=min_edge, edge_pairs=edge_pairs, eval_inputs=eval_inputs)
    ver = InterchangeVerifier(model, n_inputs=inputs, seed=seed)
    parts = assemble_circuit(model, ver, verification, settings, seed, progress)
    return make_circuit(parts, {"controls_summary": parts.loop.verification.controls_summary()})


# ---- whole case studies ------------------------------------------------------------------------
class CaseRun(JsonResult):
    """What ``run_case`` produced: where the report is, and its results and manifest."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.out = Path(summary["out"])

    @property
    def results(self) -> dict[str, Any]:
        from circuitkit.validate import read_json

        return read_json(self.out / "results.json", "case results")

    @property
    def claims(self) -> dict[str, Any]:
        """The paper's claims and whether each holds here."""
        return self.results.get("claims", {})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary)


def run_case(case: str | CaseConfig, out: str | Path, work: str | Path | None = None, quick: bool = False,
             device: str = "cpu", progress: bool = True, threads: int | None = None) -> CaseRun:
    """Run a case study end to end (stages cached in ``work``, default ``runs/<name>``) and write its report
    (``index.html``, ``report.md``, ``results.json``, ``circuit.*``) to ``out``."""
    from circuitkit.pipeline.run import run_case as _run

    cfg = case if isinstance(case, CaseConfig) else load_case(case, quick=quick)
    work_dir = Path(work) if work is not None else Path("runs") / (cfg.name + ("-quick" if cfg.quick else ""))
    return CaseRun(_run(cfg, Path(out), work_dir, device=device, progress=progress,
                        log=print if progress else (lambda _msg: None), threads=threads))


__all__ = ["Circuit", "CaseRun", "build_circuit", "hypothesize", "invert", "load_case", "load_decoder",
           "load_model", "load_task", "patch", "run_case", "sweep", "train_decoder", "verify"]
