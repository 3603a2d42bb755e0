"""Cumulative group patching, forward and backward order (the InversionView paper's tables).

Groups are lists of sites (each with a position).  Forward order patches groups[0], then
groups[0] + groups[1], ...; backward order patches groups[-1], then groups[-1] + groups[-2], ...
Each step is one forward pass that patches every site of its groups at once from the source.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.ablations import Ablation, as_ids, build_patches
from circuitkit.patching.metrics import MetricContext, evaluate, metric_context
from circuitkit.patching.node import resid_names, run_with_patches
from circuitkit.results import JsonResult
from circuitkit.sites import Site, parse_site
from circuitkit.stats import estimate


@dataclass
class Group:
    name: str
    sites: list[Site]

    @classmethod
    def parse(cls, name: str, sites: Sequence[str | Site]) -> Group:
        return cls(name, [parse_site(s) if isinstance(s, str) else s for s in sites])


@dataclass
class Step:
    order: str  # forward | backward
    groups: list[str]
    patched: Tensor  # [b]


@dataclass
class CumulativeResult(JsonResult):
    """clean: [b] metric of the unpatched base; each step's patched [b]; decrease = clean - patched."""

    metric: str
    groups: list[Group]
    clean: Tensor
    steps: list[Step]
    context: MetricContext = field(repr=False)

    def decreases(self, order: str) -> list[float]:
        return [float((self.clean - s.patched).mean()) for s in self.steps if s.order == order]

    def to_dict(self, confidence: float = 0.95) -> dict:
        return {
            "metric": self.metric, "n": int(self.clean.numel()),
            "groups": [{"name": g.name, "sites": [str(s) for s in g.sites]} for g in self.groups],
            "clean": estimate(self.clean, confidence).to_dict(),
            "steps": [{"order": s.order, "groups": s.groups, "patched": estimate(s.patched, confidence).to_dict(),
                       "decrease": estimate(self.clean - s.patched, confidence).to_dict()} for s in self.steps],
        }


@torch.no_grad()
def cumulative_patch(
    pm: ProbedModel,
    base: Sequence[str] | Tensor,
    source: Sequence[str] | Tensor | None,
    groups: Sequence[Group],
    orders: Sequence[str] = ("forward", "backward"),
    ablation: str | Ablation = "interchange",
    metric: str = "logit_diff",
    target: str | None = None,
    reference: Sequence[str] | Tensor | None = None,
    seed: int = 0,
) -> CumulativeResult:
    """Patch the groups cumulatively in each order; positions are resolved per input by name."""
    if not groups:
        raise CircuitkitError("give at least one group of sites")
    bad = [o for o in orders if o not in ("forward", "backward")]
    if bad:
        raise CircuitkitError(f"unknown order {bad[0]!r}; valid: forward, backward")
    task, dev = pm.task, pm.device
    base_ids = as_ids(task, base, "base")
    src_ids = None if source is None else as_ids(task, source, "source")
    ref_ids = None if reference is None else as_ids(task, reference, "reference")
    all_sites = [s for g in groups for s in g.sites]
    patches = build_patches(pm, base_ids, all_sites, ablation, src_ids, ref_ids, seed)
    by_group, i = [], 0
    for g in groups:
        by_group.append(patches[i:i + len(g.sites)])
        i += len(g.sites)
    clean_logits, cache = pm.runner.run(base_ids.to(dev), cache=resid_names(pm.n_layers))
    ctx = metric_context(task, base_ids, src_ids, target, clean_logits)
    clean = evaluate(metric, clean_logits, ctx)[0].cpu()
    steps = []
    for order in orders:
        seq = list(range(len(groups))) if order == "forward" else list(range(len(groups)))[::-1]
        for k in range(1, len(seq) + 1):
            chosen = sorted(seq[:k])
            ps = [p for j in chosen for p in by_group[j]]
            logits = run_with_patches(pm.runner, base_ids.to(dev), ps, cache)
            steps.append(Step(order, [groups[j].name for j in seq[:k]], evaluate(metric, logits, ctx)[0].cpu()))
    return CumulativeResult(metric, list(groups), clean, steps, ctx)


def to_markdown(results: dict[str, CumulativeResult], title: str = "") -> str:
    """Cumulative patching of any task as a Markdown table: per contrast and order, the mean decrease of
    the metric after each step, with its 95% bootstrap CI (the counting table adds the paper's values)."""
    first = next(iter(results.values()))
    k = len(first.groups)
    legend = " · ".join(f"{i} = {g.name}" for i, g in enumerate(first.groups, 1))
    labels = {"forward": [("+".join(str(j) for j in range(1, i + 1)) if i < k else "all") for i in range(1, k + 1)],
              "backward": [("+".join(str(j) for j in range(k, k - i, -1)) if i < k else "all") for i in range(1, k + 1)]}
    lines = [f"### {title}" if title else "", "",
             f"Decrease of {first.metric} (clean − patched; mean over examples, 95% bootstrap CI) when groups are "
             f"patched cumulatively. Groups: {legend}.", "",
             "| contrast | clean | order | " + " | ".join(f"step {i}" for i in range(1, k + 1)) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in range(k)) + " |"]
    for c, r in results.items():
        clean = estimate(r.clean)
        for order in ("forward", "backward"):
            ests = [estimate(r.clean - s.patched) for s in r.steps if s.order == order]
            cells = [f"{e.mean:.2f} [{e.ci_low:.2f}, {e.ci_high:.2f}]" for e in ests]
            lines.append(f"| {c} | {clean.mean:.2f} [{clean.ci_low:.2f}, {clean.ci_high:.2f}] | "
                         f"{order} ({' · '.join(labels[order])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
