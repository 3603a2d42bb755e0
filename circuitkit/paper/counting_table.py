"""Reproduce the InversionView paper's counting patching table (section 4.1, contrasts R and F).

LD = logit(true count) - logit(contrast's count) at ``:``.  Groups, in forward order:
(1) positional embeddings at the query letter Q and at ``:``; (2) a0.0 + token embedding at Q;
(3) a0.0 at ``:``; (4) a1.0 at ``:`` — patched cumulatively forward (1, 1+2, 1+2+3, all) and
backward (4, 4+3, 4+3+2, all).  Reported: the *decrease* in LD (clean LD - patched LD).

Contrast R: a random test example whose answer differs (its length may differ: positions are
aligned by name, per input); inputs with the minimum (3) or maximum (27) number of letters are
excluded from the pool, as in the paper.  Contrast F: flip one letter to another of the input's
letters so the query count changes (``CountingTask.contrast_minimal``).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from circuitkit.errors import CircuitkitError
from circuitkit.io_utils import atomic_write_json, atomic_write_text
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.groups import CumulativeResult, Group, cumulative_patch
from circuitkit.patching.inputs import paired_inputs
from circuitkit.stats import Estimate, estimate

PAPER = {
    "R": {"clean": 22.12, "forward": [15.13, 37.22, 41.18, 44.25], "backward": [37.94, 42.94, 42.94, 44.25]},
    "F": {"clean": 18.22, "forward": [0.00, 34.52, 34.55, 35.53], "backward": [35.43, 35.54, 35.53, 35.53]},
}

#: share of the all-groups LD decrease that a1.0 at ':' alone must move to count as "most" (paper: 0.86 R, 1.00 F)
A1_ALONE_MIN_SHARE = 0.6


def paper_groups() -> list[Group]:
    return [
        Group.parse("pos@Q,:", ["pos@Q", "pos@:"]),
        Group.parse("a0.0+emb@Q", ["a0.0@Q", "emb@Q"]),
        Group.parse("a0.0@:", ["a0.0@:"]),
        Group.parse("a1.0@:", ["a1.0@:"]),
    ]


def _n_letters(text: str) -> int:
    return text.index("|") - 1


def _count(text: str) -> str:
    return text[text.index(":") + 1]


def contrast_pairs(pm: ProbedModel, contrast: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` (base, source) pairs from the test split under contrast R or F."""
    if pm.task.name != "counting":
        raise CircuitkitError(f"the counting table needs a counting model, not {pm.task.name!r}")
    rng = random.Random(seed)
    test = list(pm.task.split("test"))
    if contrast == "R":
        pool = [t for t in rng.sample(test, min(len(test), 20 * n)) if 3 < _n_letters(t) < 27]
        base = pool[:n]
        src = []
        for t in base:
            while True:
                s = rng.choice(pool)
                if _count(s) != _count(t):
                    src.append(s)
                    break
        return base, src
    if contrast == "F":  # some inputs have no flip that keeps every count in 1..9 (e.g. three single letters)
        return paired_inputs(pm.task, pm.task.contrast_minimal, n, rng, oversample=3)
    raise CircuitkitError(f"unknown contrast {contrast!r}; valid: R (random other example), F (flip one letter)")


def counting_table(pm: ProbedModel, n: int = 1000, contrasts: Sequence[str] = ("R", "F"),
                   seed: int = 0) -> dict[str, CumulativeResult]:
    out = {}
    for c in contrasts:
        base, src = contrast_pairs(pm, c, n, seed)
        out[c] = cumulative_patch(pm, base, src, paper_groups(), metric="logit_diff", target="count")
    return out


def to_markdown(results: dict[str, CumulativeResult], title: str = "") -> str:
    """The table (means with 95% bootstrap CIs, the paper's value in brackets) and the paper's findings."""
    lines = [f"### {title}" if title else "", "",
             "Decrease in LD (clean LD − patched LD; mean over examples, 95% bootstrap CI) when groups are patched "
             "cumulatively. Groups: 1 = pos@Q,: · 2 = a0.0+emb@Q · 3 = a0.0@: · 4 = a1.0@:.  (paper value in brackets)",
             "", "| contrast | clean LD | order | step 1 | step 2 | step 3 | all |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, r in results.items():
        pc = PAPER.get(c, {}).get("clean")
        clean_s = _cell(estimate(r.clean), pc)
        for order, labels in (("forward", "1 · 1+2 · 1+2+3 · all"), ("backward", "4 · 4+3 · 4+3+2 · all")):
            ests = [estimate(r.clean - s.patched) for s in r.steps if s.order == order]
            paper = PAPER.get(c, {}).get(order) or [None] * len(ests)
            cells = [_cell(e, p) for e, p in zip(ests, paper)]
            lines.append(f"| {c} | {clean_s} | {order} ({labels}) | " + " | ".join(cells) + " |")
    lines += ["", "The paper's findings on this model:", ""] + [f"- {s}" for s in finding_lines(findings(results))]
    return "\n".join(lines) + "\n"


def _cell(e: Estimate, paper: float | None) -> str:
    return f"{e.mean:.2f} [{e.ci_low:.2f}, {e.ci_high:.2f}]" + ("" if paper is None else f" ({paper:.2f})")


def finding_lines(checks: dict) -> list[str]:
    """Each paper finding, the paper's figure, this model's figure and whether it reproduces."""
    out = []
    for c in ("R", "F"):
        if c not in checks:
            continue
        share, paper = checks[c]["a1.0_alone_share_of_total"], PAPER[c]["backward"][0] / PAPER[c]["backward"][-1]
        verdict = "reproduced" if share is not None and share >= A1_ALONE_MIN_SHARE else "not reproduced"
        out.append(f"a1.0 at `:` alone moves most of the LD ({c}): share of the all-groups decrease {share:.2f} "
                   f"(paper {paper:.2f}; reproduced when ≥ {A1_ALONE_MIN_SHARE}) — {verdict}")
    if "pos_emb_matters_under_R_not_F" in checks:
        r, f = checks["R"]["pos_emb_alone"], checks["F"]["pos_emb_alone"]
        verdict = "reproduced" if checks["pos_emb_matters_under_R_not_F"] else "not reproduced"
        out.append(f"positional embeddings matter only when the length changes: alone they move {r:.2f} under R and "
                   f"{f:.2f} under F (paper {PAPER['R']['forward'][0]:.2f} / {PAPER['F']['forward'][0]:.2f}) — {verdict}")
    return out


def write_table(results: dict[str, CumulativeResult], out_dir: str | Path, meta: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    data = {"paper": PAPER, "meta": meta or {}, "results": {c: r.to_dict() for c, r in results.items()},
            "checks": findings(results)}
    atomic_write_json(out_dir / "counting_patch_table.json", data)
    title = "Counting: cumulative patching" + (f" ({meta['model']}, n={meta['n']})" if meta and "model" in meta else "")
    atomic_write_text(out_dir / "counting_patch_table.md", to_markdown(results, title))
    return data


def findings(results: dict[str, CumulativeResult]) -> dict:
    """The paper's qualitative claims, evaluated on these results."""
    out: dict = {}
    for c, r in results.items():
        fwd, bwd = r.decreases("forward"), r.decreases("backward")
        total = fwd[-1]
        out[c] = {
            "forward_all_equals_backward_all": abs(fwd[-1] - bwd[-1]) < 1e-3,
            "a1.0_alone_share_of_total": bwd[0] / total if total else None,
            "pos_emb_alone": fwd[0],
            "clean_ld": float(r.clean.mean()),
        }
    if "R" in out and "F" in out:
        out["pos_emb_matters_under_R_not_F"] = abs(out["F"]["pos_emb_alone"]) < 0.05 * max(
            abs(out["R"]["pos_emb_alone"]), 1e-9) or abs(out["F"]["pos_emb_alone"]) < 1e-4
    return out
