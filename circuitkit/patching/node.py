"""Node patching: patch one or more sites (each at a position) and read a metric per example."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.runner import ModelRunner
from circuitkit.patching import engine
from circuitkit.patching.ablations import Ablation, PositionSpec, as_ids, build_patches, get_ablation
from circuitkit.patching.engine import Patch
from circuitkit.patching.metrics import MetricContext, evaluate, metric_context
from circuitkit.results import JsonResult
from circuitkit.sites import Site, group_sites, parse_site
from circuitkit.stats import Estimate, estimate


def resid_names(n_layers: int) -> list[str]:
    return [f"blocks.{L}.hook_resid_pre" for L in range(n_layers)]


def resid_by_layer(cache: dict[str, Tensor]) -> dict[int, Tensor]:
    """{L: the residual stream entering block L} from a cache holding ``resid_names`` (what ``engine.run``
    starts from)."""
    return {int(h.split(".")[1]): v for h, v in cache.items() if h.endswith("hook_resid_pre")}


def run_with_patches(runner: ModelRunner, ids: Tensor, patches: Sequence[Patch],
                     base_resid: dict[str, Tensor] | None = None) -> Tensor:
    """Patched logits [b, pos, vocab].  With ``base_resid`` (the base's ``blocks.L.hook_resid_pre``
    activations) the forward starts at the earliest patched layer instead of the embeddings."""
    return engine.run(runner, ids, patches, resid=resid_by_layer(base_resid) if base_resid else None)  # type: ignore[return-value]


@dataclass
class NodePatchResult(JsonResult):
    """Per-example metric without and with the patch; effect = clean - patched."""

    metric: str
    sites: list[str]
    ablation: str
    clean: Tensor  # [b]
    patched: Tensor  # [b]
    context: MetricContext = field(repr=False)

    @property
    def effect(self) -> Tensor:
        return self.clean - self.patched

    def summary(self, confidence: float = 0.95, seed: int = 0) -> dict[str, Estimate]:
        return {k: estimate(v, confidence, seed=seed) for k, v in
                (("clean", self.clean), ("patched", self.patched), ("effect", self.effect))}

    def to_dict(self, per_example: bool = False) -> dict:
        d = {"metric": self.metric, "sites": self.sites, "ablation": self.ablation, "n": len(self.clean),
             **{k: v.to_dict() for k, v in self.summary().items()}}
        if per_example:
            d["per_example"] = {"clean": self.clean.tolist(), "patched": self.patched.tolist()}
        return d


@torch.no_grad()
def interchange_logits(pm: ProbedModel, base_ids: Tensor, source_ids: Tensor, site: Site | Sequence[Site]) -> Tensor:
    """Logits [b, pos, vocab] of the base inputs with ``site`` — or every site of a group at once — (at its
    named position, resolved per input in base and source separately) replaced by the source's activation."""
    patches = build_patches(pm, base_ids, group_sites(site), "interchange", source_ids=source_ids)
    return run_with_patches(pm.runner, base_ids.to(pm.device), patches)


@torch.no_grad()
def patch_nodes(
    pm: ProbedModel,
    base: Sequence[str] | Tensor,
    sites: Sequence[Site | str],
    ablation: str | Ablation = "interchange",
    source: Sequence[str] | Tensor | None = None,
    reference: Sequence[str] | Tensor | None = None,
    metric: str = "logit_diff",
    target: str | None = None,
    seed: int = 0,
    base_positions: Sequence[PositionSpec] | None = None,
    source_positions: Sequence[PositionSpec] | None = None,
) -> NodePatchResult:
    """Patch all ``sites`` at once (values from ``ablation``) into the base run.

    Sites carry their position (``a1.0@:``; none = every position).  ``logit_diff`` compares the
    base's answer with the task's competitor, else with the source's answer.
    """
    task = pm.task
    site_objs = [parse_site(s) if isinstance(s, str) else s for s in sites]
    base_ids = as_ids(task, base, "base")
    src_ids = None if source is None else as_ids(task, source, "source")
    ref_ids = None if reference is None else as_ids(task, reference, "reference")
    patches = build_patches(pm, base_ids, site_objs, ablation, src_ids, ref_ids, seed, base_positions, source_positions)
    dev = pm.device
    clean_logits, cache = pm.runner.run(base_ids.to(dev), cache=resid_names(pm.n_layers))
    ctx = metric_context(task, base_ids, src_ids, target, clean_logits)
    patched_logits = run_with_patches(pm.runner, base_ids.to(dev), patches, cache)
    return NodePatchResult(metric, [str(s) for s in site_objs], get_ablation(ablation).value,
                           evaluate(metric, clean_logits, ctx)[0].cpu(),
                           evaluate(metric, patched_logits, ctx)[0].cpu(), ctx)
