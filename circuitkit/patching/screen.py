"""Coverage screen: which (site, named position) pairs matter at all, by aligned resample patching.

Every site (e.g. the decoder's sites: residual stream, heads, MLP outputs) at every named
position is patched from an aligned source (``Task.fair_sources`` with the layout held: same
length or template, so every position lines up) into the base; the effect is the share of the
answers read at or after the position whose prediction changes, with a bootstrap CI.  Pairs
whose effect reaches ``threshold`` go on to hypothesis generation and verification, so hypotheses
are tested wherever patching shows the model uses something, not only where a config guessed.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.inputs import paired_inputs
from circuitkit.patching.node import interchange_logits
from circuitkit.results import JsonResult
from circuitkit.sites import Site
from circuitkit.stats import proportion
from circuitkit.tasks.base import LAYOUT


@dataclass(frozen=True)
class ScreenRow:
    site: str  # site@position
    change: float  # share of downstream answers whose prediction changes under aligned resampling
    ci_low: float
    ci_high: float
    n: int
    kept: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScreenResult(JsonResult):
    rows: list[ScreenRow]
    threshold: float
    n_examples: int

    @property
    def kept(self) -> list[str]:
        return [r.site for r in self.rows if r.kept]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "n_examples": self.n_examples,
                "rule": f"kept when the change rate of the answers at or after the position under aligned resample "
                        f"patching is >= {self.threshold}",
                "rows": [r.to_dict() for r in self.rows], "kept": self.kept}


def aligned_pairs(pm: ProbedModel, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` test-split bases, each with one aligned resample source (same layout)."""
    task = pm.task
    bases, sources = paired_inputs(task, lambda t, r: next(iter(task.fair_sources(t, r, 1, (LAYOUT,))), None), n,
                                   random.Random(50_000 + seed), oversample=4)
    if not bases:
        raise CircuitkitError(f"{task.name}: no aligned sources found for the screen")
    return bases, sources


@torch.no_grad()
def screen_sites(pm: ProbedModel, sites: Sequence[Site], positions: Sequence[str | int], n: int = 300,
                 seed: int = 0, threshold: float = 0.05, progress: bool = False) -> ScreenResult:
    """Aligned resample patching of every ``site`` at every position (see the module docstring)."""
    task = pm.task
    bases, sources = aligned_pairs(pm, n, seed)
    base_ids, src_ids = task.encode(bases), task.encode(sources)
    btoks = [task.tokens(b) for b in bases]
    targets = [task.targets(t) for t in btoks]
    clean = pm.runner.logits(base_ids.to(pm.device)).argmax(-1).cpu()
    causal = pm.runner.arch.causal  # a bidirectional model's site can change answers before it too
    todo = []
    for pos in positions:
        rows = [i for i, t in enumerate(btoks) if _has(task, pos, t)]
        if rows:
            todo += [(s.at(pos), rows) for s in sites]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="screen", unit="site")
    out = []
    for site, rows in todo:
        ri = torch.tensor(rows)
        pred = interchange_logits(pm, base_ids[ri], src_ids[ri], site).argmax(-1).cpu()
        changed = []
        for r, i in enumerate(rows):
            p = task.resolve_position(site.position, btoks[i])
            changed += [float(pred[r, t.position] != clean[i, t.position]) for t in targets[i]
                        if t.position >= p or not causal]
        if changed:
            e = proportion(np.array(changed))
            out.append(ScreenRow(str(site), round(e.mean, 4), round(e.ci_low, 4), round(e.ci_high, 4), e.n,
                                 e.mean >= threshold))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return ScreenResult(out, threshold, len(bases))


def _has(task, position: str | int, tokens) -> bool:
    try:
        task.resolve_position(position, tokens)
        return True
    except CircuitkitError:
        return False


__all__ = ["ScreenRow", "ScreenResult", "aligned_pairs", "screen_sites"]
