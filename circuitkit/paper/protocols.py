"""What the papers did differently for one task, plugged into a case study by the task's name.

The pipeline runs the same stages for every task; where a paper used its own protocol, the task's entry here
says so, and the pipeline calls it without naming the task:

=========  ==========================================  ==================================================
task       cumulative group table                      comparison in the report
=========  ==========================================  ==================================================
counting   InversionView §4.1's protocol and values    –
ioi        the generic one                             Wang et al. (2022)'s head classes, on a 12 × 12 model
=========  ==========================================  ==================================================
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.paper import counting_table
from circuitkit.patching.groups import CumulativeResult


@dataclass(frozen=True)
class GroupTable:
    """A cumulative group-patching table: results per contrast (R, F), its Markdown, the paper's values and
    the findings the case's ``kind = "finding"`` claims read."""

    results: dict[str, CumulativeResult]
    markdown: str
    paper: dict
    findings: dict


@dataclass(frozen=True)
class Comparison:
    """A table that sets the run's findings beside a paper's ground truth, for models of one shape."""

    title: str
    columns: tuple[str, ...]
    shape: tuple[int, int]  # (layers, heads) the ground truth is about
    rows: Callable[[dict | None, set[str], int, int], list[list]]  # (head map, verified nodes, layers, heads)
    other_shape: str  # said instead, for a model of another shape ({layers}, {heads} filled in)


@dataclass(frozen=True)
class PaperProtocol:
    group_table: Callable[[ProbedModel, int, int, str], GroupTable] | None = None  # (model, n, seed, title)
    comparison: Comparison | None = None


def _counting_group_table(pm: ProbedModel, n: int, seed: int, title: str) -> GroupTable:
    """The paper's exact protocol: contrast R may change the length (positions aligned by name), F flips a letter."""
    results = counting_table.counting_table(pm, n=n, seed=seed)
    return GroupTable(results, counting_table.to_markdown(results, title), counting_table.PAPER,
                      counting_table.findings(results))


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


def wang_rows(head_map: dict | None, verified: set[str], n_layers: int, n_heads: int) -> list[list]:
    """Per Wang et al. head class: its heads, the largest head-patching effect at END (the sweep's ``head_map``:
    ``mean`` [layer, pos, head] and ``base_mean``) and which of its heads circuitkit verified (``verified``:
    nodes like ``a9.9``)."""
    rows = []
    for cls, heads in WANG_HEAD_CLASSES.items():
        effects, found = [], []
        for h in heads:
            L, H = map(int, h.split("."))
            if L >= n_layers or H >= n_heads:
                continue
            if head_map is not None:
                effects.append(head_map["base_mean"] - float(np.asarray(head_map["mean"])[L, :, H].min()))
            if f"a{L}.{H}" in verified:
                found.append(h)
        rows.append([cls, ", ".join(heads), f"{max(effects):.3f}" if effects else "n/a", ", ".join(found) or "none"])
    return rows


WANG = Comparison("Comparison with Wang et al.'s IOI head classes",
                  ("Wang et al. class", "heads", "max patching effect (LD decrease)", "verified by circuitkit"),
                  (12, 12), wang_rows,
                  "The probed model here has {layers} layers × {heads} heads, not GPT-2 small's 12 × 12, so the "
                  "ground-truth head classes do not apply; supply GPT-2 small locally to compare (see the model "
                  "section and case_studies/ioi.toml).")

PROTOCOLS: Mapping[str, PaperProtocol] = {
    "counting": PaperProtocol(group_table=_counting_group_table),
    "ioi": PaperProtocol(comparison=WANG),
}


def paper_protocol(task_name: str) -> PaperProtocol:
    """The paper's protocol for a task (the generic one, all fields None, for a task no paper covers)."""
    return PROTOCOLS.get(task_name, PaperProtocol())
