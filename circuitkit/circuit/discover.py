"""The whole chain in one call: hypotheses -> verification (with null controls) -> circuit -> evaluation."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import networkx as nx

from circuitkit.circuit.evaluate import CircuitEvaluation, evaluate_circuit
from circuitkit.circuit.graph import build_circuit
from circuitkit.hypotheses.preimage_sources import PoolPreimage, PreimageSource
from circuitkit.hypotheses.records import HypothesisReport, Thresholds
from circuitkit.hypotheses.scoring import generate_hypotheses
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site
from circuitkit.verify.interchange import InterchangeVerifier, VerifyThresholds
from circuitkit.verify.report import VerificationReport, verify_hypotheses


@dataclass
class Discovery:
    hypotheses: HypothesisReport
    verification: VerificationReport
    graph: nx.DiGraph
    evaluation: CircuitEvaluation | None
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"n_hypotheses_tested": self.hypotheses.n_tested, "n_accepted": len(self.hypotheses.accepted()),
                "n_verified_nodes": len(self.verification.nodes),
                "controls": self.verification.to_dict()["controls_summary"],
                "faithfulness": self.evaluation.faithfulness if self.evaluation else None,
                "timings_s": self.timings}


def discover_circuit(pm: ProbedModel, sites: Sequence[Site], n_queries: int = 60, pool: int = 20000,
                     source: PreimageSource | None = None, thresholds: Thresholds | None = None,
                     verify_thresholds: VerifyThresholds | None = None, n_inputs: int = 3000, n_pairs: int = 200,
                     eval_inputs: int = 1000, seed: int = 0, model_name: str = "") -> Discovery:
    """Run hypothesis generation, verification, circuit assembly and evaluation."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    test = list(pm.task.split("test"))
    queries = random.Random(seed).sample(test, min(n_queries, len(test)))
    src = source or PoolPreimage(pm, pool_size=pool, seed=seed)
    hyp = generate_hypotheses(pm, sites, queries, src, thresholds=thresholds, seed=seed, model_name=model_name)
    t["hypothesize"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ver = InterchangeVerifier(pm, n_inputs=n_inputs, n_pairs=n_pairs, thresholds=verify_thresholds, seed=seed)
    vr = verify_hypotheses(ver, hyp.hypotheses, model_name=model_name)
    t["verify"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    g = build_circuit(ver, vr.nodes)
    t["circuit"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ev = evaluate_circuit(pm, [n.site for n in vr.nodes], n=eval_inputs, seed=seed) if vr.nodes else None
    t["evaluate"] = round(time.perf_counter() - t0, 1)
    return Discovery(hyp, vr, g, ev, t)


__all__ = ["Discovery", "discover_circuit"]
