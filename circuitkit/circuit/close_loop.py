"""Close the loop: a node that growth adds goes back through hypotheses and verification before it may be
called unexplained.

Growth (``circuit/grow.py``) adds, to the verified nodes, the components the circuit needs to reach its
faithfulness target.  Each round here takes the added sites that have not been examined yet, generates
hypotheses for them from ε-preimages (the same preimage source and queries as the first pass), and verifies
them by interchange on fair pairs (alone, as joint feature sets, and as site groups of one position, with the
null controls beside them: ``verification/report.py``).  Besides what preimages suggest, every site growth
added (one the first pass hypothesized too) is tested for the features that verified nodes carry ("inherited
claims"; once per site and feature, even where the site failed that test alone, since it may pass in a group
with the other sites inheriting it): first those carried at its own position, then those carried anywhere
else in the circuit.  A component beside a verified carrier is the first suspect for carrying the same variable
redundantly (IOI's layer-0 heads beside the MLP that carries the IO name), which a preimage of one small
component may not show; and a node that growth adds most likely carries one of the variables the circuit already
routes, if not the one carried beside it (two of IOI's layer-0 heads at IO carry S, the other name, which
otherwise only the nodes at S2 and END carry).  Inherited claims are tested exactly as
the rest (fair pairs, controls, site groups with held-out confirmation) and listed per round.  Newly verified
nodes join the start set, growth is run again from it, and the next round examines what that growth adds,
until a round verifies nothing new, nothing is left to examine, or ``max_rounds`` is reached.  A node that is still added then has been tested and
is reported as unexplained with the reasons its hypotheses were rejected.

Hypothesis q-values are Benjamini–Hochberg-controlled within each round's batch, as in the first pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from circuitkit.circuit.evaluate import AblationEvaluator
from circuitkit.circuit.grow import GrowthResult, grow_circuit
from circuitkit.hypotheses.records import Hypothesis, HypothesisReport
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
    inherited_claims: list[tuple[str, str]]
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
        return list(dict.fromkeys(s for r in self.rounds for s in r.examined))

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
    """``a`` with ``b``'s nodes (sites ``a`` already labels are not repeated), verdicts, controls and the lists of
    skipped proxy controls and joins tried added."""
    have = {(n.site, n.features) for n in a.nodes}
    nodes = a.nodes + [n for n in b.nodes if (n.site, n.features) not in have]
    listed = {k: a.settings.get(k, []) + b.settings.get(k, []) for k in ("proxy_controls_skipped", "joins_tried")}
    return VerificationReport(a.task, a.model, a.thresholds, nodes, a.verdicts + b.verdicts, a.controls + b.controls,
                              {**a.settings, **listed}, a.task_ref)


def node_sites(vr: VerificationReport) -> list[str]:
    """The verified nodes' sites, in order, once each (growth's start set)."""
    return list(dict.fromkeys(n.site for n in vr.nodes))


def inherited_claims(vr: VerificationReport, sites: Sequence[str],
                     tested: AbstractSet[tuple[str, str]] = frozenset()) -> list[tuple[str, str]]:
    """(site, feature) for every feature a verified node carries (those at the site's own position first, then
    the rest of the circuit's), the site does not already carry and ``tested`` does not hold (module doc)."""
    carried: dict[str, dict[str, None]] = {}
    have = {(n.site, f) for n in vr.nodes for f in n.features}
    for n in vr.nodes:
        for f in n.features:
            carried.setdefault(str(parse_site(n.site).position), {})[f] = None
    anywhere = dict.fromkeys(f for at in carried.values() for f in at)
    out = []
    for s in sites:
        beside = carried.get(str(parse_site(s).position), {})
        for f in [*beside, *(f for f in anywhere if f not in beside)]:
            if (s, f) not in have and (s, f) not in tested:
                out.append((s, f))
    return out


def _verify_round(verifier: InterchangeVerifier, vr: VerificationReport, sites: Sequence[str],
                  hypotheses: Sequence[Hypothesis], claimed: set[tuple[str, str]], model_name: str, progress: bool
                  ) -> tuple[VerificationReport, list[tuple[str, str]]]:
    """The round's verification: the preimage hypotheses with the inherited claims of ``sites`` (those growth
    added) not in ``claimed`` (inherited in an earlier round), then, while the round itself labels more sites at
    their positions, the claims those labels give the sites still unlabelled.  A claim is made even where the
    site was tested alone for the feature before: what failed alone may verify in a group with the claim's other
    sites.  Returns (the round's verification, every inherited claim tested)."""
    claims = inherited_claims(vr, sites, claimed)
    new_vr = verify_hypotheses(verifier, hypotheses, claims=claims, model_name=model_name, progress=progress,
                               known=vr.nodes)
    done = list(claims)
    while True:
        labelled = {n.site for n in new_vr.nodes}
        more = inherited_claims(merge_verification(vr, new_vr), [s for s in sites if s not in labelled],
                                claimed | set(done))
        if not more:
            return new_vr, done
        done += more
        new_vr = merge_verification(new_vr, verify_hypotheses(verifier, [], claims=more, model_name=model_name,
                                                              progress=progress, known=vr.nodes + new_vr.nodes))


def close_the_loop(ev: AblationEvaluator, verifier: InterchangeVerifier, verification: VerificationReport,
                   candidates: Sequence[Site], target: float, hypothesize: Hypothesize | None,
                   hypotheses: HypothesisReport | None = None, max_rounds: int = 2, model_name: str = "",
                   progress: bool = False) -> LoopResult:
    """Grow from the verified nodes, then re-examine what growth adds (module doc); ``hypothesize`` None or
    ``max_rounds`` 0: growth only.  Sites the first pass already hypothesized get no new preimage hypotheses,
    but their inherited claims are tested all the same."""
    vr, hyp = verification, hypotheses
    growth = grow_circuit(ev, node_sites(vr), candidates, target=target)
    examined = set(hyp.by_site()) if hyp is not None else set()
    rounds: list[LoopRound] = []
    claimed: set[tuple[str, str]] = set()
    for k in range(1, max_rounds + 1 if hypothesize is not None else 1):
        added = list(growth.added)
        todo = [s for s in added if s not in examined]
        if not todo and not inherited_claims(vr, added, claimed):
            break
        examined.update(todo)
        new_hyp = hypothesize([parse_site(s) for s in todo]) if todo else None
        new_vr, claims = _verify_round(verifier, vr, added, new_hyp.hypotheses if new_hyp else [], claimed,
                                       model_name, progress)
        claimed.update(claims)
        if new_hyp is not None:
            hyp = merge_hypotheses(hyp, new_hyp)
        vr = merge_verification(vr, new_vr)
        gained = list(dict.fromkeys(n.site for n in new_vr.nodes))
        if gained:
            growth = grow_circuit(ev, node_sites(vr), candidates, target=target)
        looked = set(todo) | {c for c, _ in claims}
        looked_at = [s for s in added if s in looked]
        rounds.append(LoopRound(k, looked_at, gained, claims, growth.steps[0]["faithfulness"] if growth.steps else {},
                                list(growth.added)))
        if not gained:
            break
    return LoopResult(hyp, vr, growth, rounds)


__all__ = ["Hypothesize", "LoopRound", "LoopResult", "close_the_loop", "inherited_claims", "merge_hypotheses",
           "merge_verification", "node_sites"]
