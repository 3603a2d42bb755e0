"""What each stage of a case study hands on: its summary's typed shape, and the run's results by stage.

A summary is a JSON object (``stage.json`` caches it, ``results.json`` publishes it), so its type is a
``TypedDict``: the keys later stages, the claims and the report read are named here and checked by mypy,
while a cached summary is read back without conversion.

| stage | summary | read by |
|---|---|---|
| model | ``ModelSummary`` | the report |
| decoder | ``DecoderSummary`` | the circuit stage (decoded sites), the manifest, the report |
| inversions | ``InversionsSummary`` | the report |
| patching | ``PatchingSummary`` | the report, the paper's comparison |
| groups | ``GroupsSummary`` | the claims (``findings``), the report |
| screen | ``ScreenSummary`` | the circuit stage (``kept``), the report |
| circuit | ``CircuitSummary`` | the claims (``verified_nodes``, figures), the report |
| claims | ``dict[str, str]`` (claim -> verdict) | the report |
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypedDict


class ModelSummary(TypedDict, total=False):
    source: str  # "trained here" or the checkpoint's path
    metrics: dict[str, Any]  # accuracy and the task's metric on the test split
    config: dict[str, Any]  # the training config (trained here)


class DecoderSummary(TypedDict, total=False):
    sites: list[str]  # the sites the decoder was trained on
    eval: dict[str, Any]
    curve: list[dict[str, Any]]
    steps: int | None
    train_minutes: float | None
    config: dict[str, Any]
    source: str  # a decoder given by path
    trained_by: dict[str, Any] | None


class InversionsSummary(TypedDict):
    panels: list[dict[str, Any]]


class PatchingSummary(TypedDict):
    target: str
    n: int
    maps: dict[str, dict[str, Any]]  # "contrast/kind" -> SweepResult.to_dict()


class GroupsSummary(TypedDict):
    markdown: str
    results: dict[str, dict[str, Any]]
    findings: dict[str, Any]
    paper: dict[str, Any]


class ScreenSummary(TypedDict, total=False):
    kept: list[str]  # the site-positions that go on to hypotheses
    rows: list[dict[str, Any]]
    sites: list[str]
    positions: list[str]
    skipped: str  # why there was no screen ([hypotheses] sites lists the sites)


class CircuitSummary(TypedDict, total=False):
    skipped: str
    source: str
    sites: list[str]
    summary: dict[str, Any]
    files: dict[str, str]
    evaluation: dict[str, Any] | None
    edge_evaluation: dict[str, Any] | None
    growth: dict[str, Any] | None
    curve: dict[str, Any] | None
    explained_share: float | None
    verified_faithfulness: dict[str, Any] | None
    explained_share_per_answer: dict[str, Any]
    explained_share_answer_level: dict[str, Any]
    loop: dict[str, Any] | None
    ground_truth: dict[str, Any] | None  # a compiled model's (tracr): discovery.ground_truth.GroundTruthScore
    edge_tests: list[dict[str, Any]]
    structural_tests: list[dict[str, Any]] | None  # zero-ablation tests ([circuit] structural; circuit/structural.py)
    random_model: Any
    verified_nodes: list[dict[str, Any]]


class ComparisonSummary(TypedDict, total=False):
    skipped: str  # why no comparison ran ([comparison] methods empty, or no circuit)
    n_edges_total: int
    percents: list[float]
    circuitkit_edges: int | None
    truth_edges: int | None  # a compiled model's ground-truth edges (tracr), else None
    visible_truth_edges: int | None  # those the ablation moves (``discovery.problem.moving_edges``)
    invisible_truth_edges: list[str] | None
    roc_auc_ceiling: float | None  # the best ROC AUC any score by the ablation can reach (``harness.auc_ceiling``)
    rows: list[dict[str, Any]]  # one per method / circuit (``discovery.harness.compare``)
    definitions: str
    inputs: dict[str, Any]  # the pairs the methods scored on and the pairs every circuit is judged on
    verdict: dict[str, Any]  # circuitkit's circuit against the best baseline at its size (``harness.verdict``)


@dataclass
class CaseResults:
    """The results of one run, by stage (None: the stage did not run or produced nothing)."""

    model: ModelSummary | None = None
    decoder: DecoderSummary | None = None
    inversions: InversionsSummary | None = None
    patching: PatchingSummary | None = None
    groups: GroupsSummary | None = None
    screen: ScreenSummary | None = None
    circuit: CircuitSummary | None = None
    comparison: ComparisonSummary | None = None
    claims: dict[str, str] | None = None

    @classmethod
    def stage_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def set(self, stage: str, summary: Any) -> None:
        """Store a stage's summary (a stage this type does not know is a programming error, named)."""
        if stage not in self.stage_names():
            raise KeyError(f"no stage {stage!r} in CaseResults; stages: {', '.join(self.stage_names())}")
        setattr(self, stage, summary)

    def to_dict(self, without: tuple[str, ...] = ()) -> dict[str, Any]:
        """{stage: summary} of the stages that produced one (``results.json``; ``without`` leaves some out)."""
        return {n: getattr(self, n) for n in self.stage_names() if getattr(self, n) is not None and n not in without}


__all__ = ["CaseResults", "CircuitSummary", "ComparisonSummary", "DecoderSummary", "GroupsSummary",
           "InversionsSummary", "ModelSummary", "PatchingSummary", "ScreenSummary"]
