"""Close the loop: a node that growth adds goes back through hypotheses and verification before it may be
called unexplained.

Growth (``circuit/grow.py``) adds, to the verified nodes, the components the circuit needs to reach its
faithfulness target.  Each round here takes the added sites that have not been examined yet, generates
hypotheses for them from ε-preimages (the same preimage source and queries as the first pass), and verifies
them by interchange on fair pairs (alone, as joint feature sets, and as site groups of one position, with the
null controls beside them: ``verification/report.py``).  Newly verified nodes join the start set, growth is
run again from it, and the next round examines what that growth adds, until a round verifies nothing new,
nothing is left to examine, or ``max_rounds`` is reached.  A node that is still added then has been tested and
is reported as unexplained with the reasons its hypotheses were rejected.

Hypothesis q-values are Benjamini–Hochberg-controlled within each round's batch, as in the first pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from circuitkit.circuit.evaluate import AblationEvaluator
from circuitkit.circuit.grow import GrowthResult, grow_circuit
from circuitkit.hypotheses.records import HypothesisReport
from circuitkit.results import JsonResult, to_jsonable
from circuitkit.sites import Site, parse_site
from circuitkit.verification.interchange import InterchangeVerifier
from circuitkit.verification.report import VerificationReport, verify_hypotheses

#: hypotheses for some sites, from the pass's preimage source and queries
Hypothesize = Callable[[Sequence[Site]], HypothesisReport]


@dataclass
class LoopRound:
    """One round: the grown sites examined, those that gained a verified label, the verified nodes' faithfulness
    after the round (growth's new start) and what growth then added."""

    round: int
    examined: list[str]
    verified: list[str]
    verified_faithfulness: dict[str, float]
    added_after: list[str]


@dataclass
class LoopResult(JsonResult):
    """The hypotheses and verification of the first pass plus every round's, and the final growth."""

    hypotheses: HypothesisReport | None
    verification: VerificationReport
    growth: GrowthResult
    rounds: list[LoopRound] = field(default_factory=list)

    @property
    def examined(self) -> list[str]:
        return [s for r in self.rounds for s in r.examined]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"rounds": [asdict(r) for r in self.rounds], "examined": self.examined,
                            "verified": [s for r in self.rounds for s in r.verified],
                            "still_unexplained": list(self.growth.added), "definitions": __doc__})


def merge_hypotheses(a: HypothesisReport | None, b: HypothesisReport) -> HypothesisReport:
    """``a`` with ``b``'s hypotheses, coverage and test count added (``a`` None: ``b``)."""
    if a is None:
        return b
    return HypothesisReport(a.task, a.model, a.source, a.eps, a.thresholds, a.hypotheses + b.hypotheses,
                            {**a.coverage, **b.coverage}, a.n_tested + b.n_tested, a.settings, a.task_ref)


def merge_verification(a: VerificationReport, b: VerificationReport) -> VerificationReport:
    """``a`` with ``b``'s nodes (sites ``a`` already labels are not repeated), verdicts and controls added."""
    have = {(n.site, n.features) for n in a.nodes}
    nodes = a.nodes + [n for n in b.nodes if (n.site, n.features) not in have]
    return VerificationReport(a.task, a.model, a.thresholds, nodes, a.verdicts + b.verdicts, a.controls + b.controls,
                              a.settings, a.task_ref)


def node_sites(vr: VerificationReport) -> list[str]:
    """The verified nodes' sites, in order, once each (growth's start set)."""
    return list(dict.fromkeys(n.site for n in vr.nodes))


def close_the_loop(ev: AblationEvaluator, verifier: InterchangeVerifier, verification: VerificationReport,
                   candidates: Sequence[Site], target: float, hypothesize: Hypothesize | None,
                   hypotheses: HypothesisReport | None = None, max_rounds: int = 2, model_name: str = "",
                   progress: bool = False) -> LoopResult:
    """Grow from the verified nodes, then re-examine what growth adds (module doc); ``hypothesize`` None or
    ``max_rounds`` 0: growth only.  Sites the first pass already hypothesized are not examined again."""
    vr, hyp = verification, hypotheses
    growth = grow_circuit(ev, node_sites(vr), candidates, target=target)
    examined = set(hyp.by_site()) if hyp is not None else set()
    rounds: list[LoopRound] = []
    for k in range(1, max_rounds + 1 if hypothesize is not None else 1):
        todo = [s for s in growth.added if s not in examined]
        if not todo:
            break
        examined.update(todo)
        new_hyp = hypothesize([parse_site(s) for s in todo])
        new_vr = verify_hypotheses(verifier, new_hyp.hypotheses, model_name=model_name, progress=progress)
        hyp, vr = merge_hypotheses(hyp, new_hyp), merge_verification(vr, new_vr)
        gained = list(dict.fromkeys(n.site for n in new_vr.nodes))
        if gained:
            growth = grow_circuit(ev, node_sites(vr), candidates, target=target)
        rounds.append(LoopRound(k, todo, gained, growth.steps[0]["faithfulness"] if growth.steps else {},
                                list(growth.added)))
        if not gained:
            break
    return LoopResult(hyp, vr, growth, rounds)


__all__ = ["Hypothesize", "LoopRound", "LoopResult", "close_the_loop", "merge_hypotheses", "merge_verification",
           "node_sites"]
