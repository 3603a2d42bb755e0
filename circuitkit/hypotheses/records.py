"""JSON-serialisable records: hypotheses with their evidence, and the settings that produced them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from circuitkit.results import JsonResult, SettingsRecord


@dataclass(frozen=True)
class Example:
    """One preimage member shown as evidence: the input, where it matched, its distance, f's value."""

    query: str
    text: str
    position: int
    distance: float
    value: Any
    query_value: Any


@dataclass(frozen=True)
class Hypothesis:
    """"Site ``site`` at position ``position`` carries feature ``feature``" with its statistics.

    agreement: mean over queries of the share of preimage members whose feature value equals the
    query's; baseline: the same share over non-members (outside ε) / random inputs; lift =
    agreement / baseline; kappa = (agreement − baseline) / (1 − baseline), the chance-corrected
    agreement (1 = the preimage always agrees, 0 = no better than the baseline), which compares
    features with few values (carry) and many values (digit sums) on one scale.  p_value: one-sided sign test over queries (agreement > baseline);
    q_value: Benjamini–Hochberg across every hypothesis tested in the run.
    """

    site: str  # paper notation with position, e.g. "a1.0@:"
    feature: str
    agreement: float
    baseline: float
    lift: float
    kappa: float
    p_value: float
    q_value: float
    n_queries: int  # queries with at least one member where f is defined
    n_members: int
    n_baseline: int
    accepted: bool
    aliases: tuple[str, ...] = ()
    implied_by: str = ""  # an accepted feature at the same site that determines this one at least as well
    rank: int = 0
    examples: tuple[Example, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.site, self.feature)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["examples"] = [asdict(e) for e in self.examples]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hypothesis:
        d = dict(d)
        d["aliases"] = tuple(d.get("aliases", ()))
        d["examples"] = tuple(Example(**e) for e in d.get("examples", ()))
        return cls(**d)


@dataclass(frozen=True)
class Thresholds(SettingsRecord):
    """When a hypothesis is accepted (all must hold); stated in every output."""

    fdr: float = 0.05  # Benjamini–Hochberg q-value at most this
    min_kappa: float = 0.4  # chance-corrected agreement
    min_lift: float = 1.25
    min_queries: int = 5  # queries with at least one preimage member

    def describe(self) -> str:
        return (f"accepted when BH q <= {self.fdr}, kappa = (agreement - baseline)/(1 - baseline) >= "
                f"{self.min_kappa}, lift >= {self.min_lift}, not implied by a feature accepted at the site with at "
                f"least the same kappa, "
                f"and >= {self.min_queries} queries have preimage members; p from a one-sided sign test over "
                f"queries (member agreement > baseline agreement)")


@dataclass
class HypothesisReport(JsonResult):
    """Everything ``hypothesize`` produced: ranked hypotheses per site plus the run's settings."""

    task: str
    model: str
    source: str
    eps: float
    thresholds: Thresholds
    hypotheses: list[Hypothesis]
    coverage: dict[str, float] = field(default_factory=dict)  # site -> share of queries with members
    n_tested: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    task_ref: dict[str, Any] = field(default_factory=dict)  # registry.task_record: reloads a plug-in task

    def accepted(self) -> list[Hypothesis]:
        return [h for h in self.hypotheses if h.accepted]

    def by_site(self) -> dict[str, list[Hypothesis]]:
        out: dict[str, list[Hypothesis]] = {}
        for h in self.hypotheses:
            out.setdefault(h.site, []).append(h)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "task_ref": self.task_ref, "model": self.model, "source": self.source, "eps": self.eps,
                "thresholds": self.thresholds.to_dict(), "thresholds_text": self.thresholds.describe(),
                "n_tested": self.n_tested, "n_accepted": len(self.accepted()), "coverage": self.coverage,
                "settings": self.settings, "hypotheses": [h.to_dict() for h in self.hypotheses]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HypothesisReport:
        return cls(d["task"], d["model"], d["source"], d["eps"], Thresholds(**d["thresholds"]),
                   [Hypothesis.from_dict(h) for h in d["hypotheses"]], d.get("coverage", {}),
                   d.get("n_tested", 0), d.get("settings", {}), d.get("task_ref") or {})
