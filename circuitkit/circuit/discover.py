"""The whole chain in one call: hypotheses -> verification (with null controls) -> circuit growth
to a faithfulness target -> graph with path-patching edges -> node- and edge-level evaluation."""
from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from circuitkit.circuit.close_loop import Hypothesize, LoopResult, close_the_loop, node_sites
from circuitkit.circuit.edges_eval import edge_faithfulness
from circuitkit.circuit.evaluate import AblationEvaluator, CircuitEvaluation, evaluate_circuit, site_role
from circuitkit.circuit.export import export_all, to_json_dict
from circuitkit.circuit.graph import CircuitNode, build_circuit, edge_list
from circuitkit.circuit.grow import FaithfulnessCurve, GrowthResult, faithfulness_curve, named_components
from circuitkit.circuit.structural import structural_pass
from circuitkit.hypotheses.preimage_sources import PoolPreimage, PreimageSource
from circuitkit.hypotheses.records import HypothesisReport, Thresholds
from circuitkit.hypotheses.scoring import generate_hypotheses
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.results import JsonResult
from circuitkit.sites import Site
from circuitkit.verification.interchange import InterchangeVerifier, VerifyThresholds
from circuitkit.verification.report import VerificationReport, verify_hypotheses

EXPLAINED_SHARE = ("share of the circuit's effect that verified features explain = normalised faithfulness of the "
                   "verified nodes alone / normalised faithfulness of the whole circuit (logit difference, 'all')")


@dataclass
class CircuitSettings:
    """How the circuit is grown, its edges tested and it is evaluated."""

    target: float = 0.9  # grow until normalised LD faithfulness reaches this on every answer
    min_edge: float = 0.1
    edge_pairs: int = 150
    eval_inputs: int = 1000
    completeness_subsets: int = 20
    positions: Sequence[str] | None = None  # growth candidates' positions (default: every named one)
    loop_rounds: int = 2  # rounds of re-examining the nodes growth adds (close_loop.py); 0: growth only
    structural: bool = False  # zero-ablation pass for what no same-layout source moves (circuit/structural.py)
    split_inputs: bool = False  # test a kept edge into a head through its query, key and value apart


@dataclass
class Circuit(JsonResult):
    """A verified circuit: its graph (verified and unexplained nodes, tested edges) and every figure measured
    on it.  ``to_dict()`` is the circuit.json layout; ``save(dir)`` writes JSON, GraphML, DOT and pictures."""

    graph: nx.DiGraph
    evaluation: CircuitEvaluation
    growth: GrowthResult
    curve: FaithfulnessCurve
    edge_evaluation: dict[str, Any]
    explained_share: float | None
    info: dict[str, Any] = field(default_factory=dict)  # controls_summary, edge_tests, timings_s ...

    @property
    def sites(self) -> list[str]:
        """The circuit's site nodes (verified first, then those growth added)."""
        return [n for n, d in self.graph.nodes(data=True) if d["kind"] == "site"]

    @property
    def faithfulness(self) -> dict[str, float]:
        """Normalised logit-difference faithfulness per answer and over all ("all")."""
        return self.evaluation.faithfulness_normalized

    def extra(self) -> dict[str, Any]:
        return {**self.info, "evaluation": self.evaluation.to_dict(), "edge_evaluation": self.edge_evaluation,
                "growth": self.growth.to_dict(), "curve": self.curve.to_dict(),
                "explained_share": self.explained_share}

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self.graph, self.extra())

    def save(self, out_dir: str | Path, picture: bool = True) -> dict[str, str]:
        """Write circuit.json / .graphml / .dot (and .svg / .png); returns {format: path}."""
        return export_all(self.graph, out_dir, extra=self.extra(), picture=picture)


@dataclass
class Assembly:
    """What ``assemble_circuit`` builds: the graph, its evaluation, the (final) growth, curves, the explained
    share overall and per answer, and the closed loop (the verification with the nodes it added)."""

    graph: nx.DiGraph
    evaluation: CircuitEvaluation
    growth: GrowthResult
    curve: FaithfulnessCurve
    edge_evaluation: dict[str, Any]
    explained_shares: dict[str, float | None]
    loop: LoopResult
    #: the same share with only the nodes verified on the answer (not those verified at the logit level)
    answer_level_shares: dict[str, float | None] = field(default_factory=dict)

    @property
    def explained_share(self) -> float | None:
        """The share over all answers (``explained_shares["all"]``)."""
        return self.explained_shares.get("all")


def make_circuit(parts: Assembly, info: dict[str, Any] | None = None) -> Circuit:
    """A ``Circuit`` from what ``assemble_circuit`` returns (the graph's edge tests move into ``info``)."""
    info = dict(info or {})
    info["edge_tests"] = parts.graph.graph.pop("edge_tests", [])
    info["structural_tests"] = parts.graph.graph.pop("structural_tests", None)
    info["explained_share_per_answer"] = parts.explained_shares
    info["explained_share_answer_level"] = parts.answer_level_shares
    info["loop"] = parts.loop.to_dict()
    return Circuit(parts.graph, parts.evaluation, parts.growth, parts.curve, parts.edge_evaluation,
                   parts.explained_share, info)


@dataclass
class Discovery:
    hypotheses: HypothesisReport
    verification: VerificationReport
    graph: nx.DiGraph
    evaluation: CircuitEvaluation | None
    growth: GrowthResult | None = None
    curve: FaithfulnessCurve | None = None
    edge_evaluation: dict[str, Any] | None = None
    explained_share: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    explained_shares: dict[str, float | None] = field(default_factory=dict)
    loop: LoopResult | None = None
    answer_level_shares: dict[str, float | None] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        vr = self.verification
        return {"n_hypotheses_tested": self.hypotheses.n_tested, "n_accepted": len(self.hypotheses.accepted()),
                "n_verified_nodes": len(vr.nodes), "n_learned_nodes": len(vr.learned_nodes),
                "n_architectural_nodes": len(vr.architectural_nodes),
                "n_unexplained_nodes": len(self.growth.added) if self.growth else 0,
                "controls": vr.controls_summary(),
                "faithfulness_normalized": self.evaluation.faithfulness_normalized if self.evaluation else None,
                "explained_share": self.explained_share, "explained_share_per_answer": self.explained_shares,
                "explained_share_answer_level": self.answer_level_shares,
                "n_logit_level_nodes": sum(n.level == "logit" for n in vr.nodes),
                "n_examined_by_loop": len(self.loop.examined) if self.loop else 0, "timings_s": self.timings}

    def circuit(self) -> Circuit:
        """The circuit part of this discovery as a ``Circuit`` (controls and timings in its info)."""
        assert self.evaluation is not None and self.growth is not None and self.curve is not None
        assert self.loop is not None
        parts = Assembly(self.graph, self.evaluation, self.growth, self.curve, self.edge_evaluation or {},
                         self.explained_shares, self.loop, self.answer_level_shares)
        return make_circuit(parts, {"controls_summary": self.verification.controls_summary(),
                                    "timings_s": self.timings})


def explained_shares(verified_only: dict[str, float], whole: dict[str, float]) -> dict[str, float | None]:
    """{answer or "all": faithfulness of the verified nodes alone / of the whole circuit}; None where either is
    undefined or the whole circuit's is ~0."""
    out: dict[str, float | None] = {}
    for k, b in whole.items():
        a = verified_only.get(k)
        ok = a is not None and b is not None and a == a and b == b and abs(b) >= 1e-9
        out[k] = round(float(a / b), 4) if ok else None
    return out


def assemble_circuit(pm: ProbedModel, verifier: InterchangeVerifier, vr: VerificationReport,
                     settings: CircuitSettings | None = None, seed: int = 0, progress: bool = False,
                     timings: dict[str, float] | None = None, hypothesize: Hypothesize | None = None,
                     hypotheses: HypothesisReport | None = None) -> Assembly:
    """Verified nodes -> growth to the faithfulness target, the grown nodes re-examined (``close_loop``) ->
    graph -> node/edge evaluation and curves.  ``hypothesize`` (default: exact ε-preimages from a pool of task
    inputs, ``PoolPreimage``) makes hypotheses for the grown sites; ``hypotheses`` are the first pass's."""
    cs = settings or CircuitSettings()
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    ev = AblationEvaluator(pm, n=cs.eval_inputs, seed=seed)
    if hypothesize is None and cs.loop_rounds > 0:
        hypothesize = pool_hypothesize(pm, seed=seed)
    loop = close_the_loop(ev, verifier, vr, named_components(ev, cs.positions), cs.target, hypothesize, hypotheses,
                          max_rounds=cs.loop_rounds, model_name=vr.model, progress=progress)
    vr, growth = loop.verification, loop.growth
    start = node_sites(vr)
    t["grow_and_reexamine"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    nodes: list[Any] = list(vr.nodes) + [CircuitNode.unexplained(s) for s in growth.added]
    g = build_circuit(verifier, nodes, min_edge=cs.min_edge, n_pairs=cs.edge_pairs, progress=progress,
                      split_inputs=cs.split_inputs)
    t["edges"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    sites = start + list(growth.added)
    evaluation = evaluate_circuit(pm, sites, evaluator=ev, n_subsets=cs.completeness_subsets, seed=seed)
    edge_eval = edge_faithfulness(ev, sites, edge_list(g))
    edge_eval = edge_eval.to_dict() if hasattr(edge_eval, "to_dict") else edge_eval
    curve = faithfulness_curve(ev, growth)
    verified_only = ev.faithfulness(start) if start else {k: 0.0 for k in evaluation.faithfulness_normalized}
    shares = explained_shares(verified_only, evaluation.faithfulness_normalized)
    answer_sites = list(dict.fromkeys(n.site for n in vr.nodes if n.level == "answer"))
    if answer_sites == start:
        answer_shares = dict(shares)
    else:
        answer_only = ev.faithfulness(answer_sites) if answer_sites else {k: 0.0 for k in shares}
        answer_shares = explained_shares(answer_only, evaluation.faithfulness_normalized)
    share = shares.get("all")
    t["evaluate"] = round(time.perf_counter() - t0, 1)
    g.graph["explained_share"] = -1.0 if share is None else share
    if cs.structural:  # after evaluation: resample ablation leaves what it adds as it is
        t0 = time.perf_counter()
        g.graph["structural_tests"] = [z.to_dict() for z in structural_pass(verifier, g, cs.min_edge, cs.edge_pairs,
                                                                            seed, progress, cs.split_inputs)]
        t["structural"] = round(time.perf_counter() - t0, 1)
    return Assembly(g, evaluation, growth, curve, edge_eval, shares, loop, answer_shares)


def pool_hypothesize(pm: ProbedModel, pool: int = 20000, n_queries: int = 60, seed: int = 0,
                     thresholds: Thresholds | None = None) -> Hypothesize:
    """Hypotheses for any sites from exact ε-preimages in a pool of task inputs (built on first use)."""
    cache: dict[str, PreimageSource] = {}

    def run(sites: Sequence[Site]) -> HypothesisReport:
        if "pool" not in cache:
            cache["pool"] = PoolPreimage(pm, pool_size=pool, seed=seed)
        test = list(pm.task.split("test"))
        queries = random.Random(seed).sample(test, min(n_queries, len(test)))
        return generate_hypotheses(pm, sites, queries, cache["pool"], thresholds=thresholds, seed=seed)

    return run


def discover_circuit(pm: ProbedModel, sites: Sequence[Site], n_queries: int = 60, pool: int = 20000,
                     source: PreimageSource | None = None, thresholds: Thresholds | None = None,
                     verify_thresholds: VerifyThresholds | None = None, n_inputs: int = 3000, n_pairs: int = 200,
                     eval_inputs: int = 1000, seed: int = 0, model_name: str = "",
                     settings: CircuitSettings | None = None, progress: bool = False,
                     claims: Sequence[tuple[str, str]] = ()) -> Discovery:
    """Run hypothesis generation, verification (of the accepted hypotheses and of pre-registered
    ``claims`` (site, feature)), circuit growth, edges and evaluation."""
    cs = settings or CircuitSettings(eval_inputs=eval_inputs)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    test = list(pm.task.split("test"))
    queries = random.Random(seed).sample(test, min(n_queries, len(test)))
    src = source or PoolPreimage(pm, pool_size=pool, seed=seed)
    hyp = generate_hypotheses(pm, sites, queries, src, thresholds=thresholds, seed=seed, model_name=model_name)
    t["hypothesize"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ver = InterchangeVerifier(pm, n_inputs=n_inputs, n_pairs=n_pairs, thresholds=verify_thresholds, seed=seed)
    vr = verify_hypotheses(ver, hyp.hypotheses, model_name=model_name, progress=progress, claims=claims)
    t["verify"] = round(time.perf_counter() - t0, 1)

    def hypothesize(more: Sequence[Site]) -> HypothesisReport:
        return generate_hypotheses(pm, more, queries, src, thresholds=thresholds, seed=seed, model_name=model_name)

    a = assemble_circuit(pm, ver, vr, cs, seed, progress, t, hypothesize=hypothesize, hypotheses=hyp)
    loop = a.loop
    return Discovery(loop.hypotheses or hyp, loop.verification, a.graph, a.evaluation, a.growth, a.curve,
                     a.edge_evaluation, a.explained_share, t, a.explained_shares, loop, a.answer_level_shares)


__all__ = ["Circuit", "CircuitSettings", "Discovery", "make_circuit", "assemble_circuit", "discover_circuit", "EXPLAINED_SHARE", "site_role", "Assembly",
           "explained_shares", "pool_hypothesize"]
