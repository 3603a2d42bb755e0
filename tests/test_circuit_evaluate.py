"""Circuit evaluation by aligned resample ablation: node faithfulness, completeness, minimality,
greedy growth, MIB curves and edge-level faithfulness, on the hand-set copy model (true circuit:
a0.0@= carries x2) and on a tiny trained addition model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from circuitkit.circuit.edges_eval import complete_edges, edge_faithfulness
from circuitkit.circuit.evaluate import AblationEvaluator, evaluate_circuit
from circuitkit.circuit.grow import faithfulness_curve, grow_circuit, named_components
from circuitkit.errors import CircuitkitError

from tests.groundtruth_copy import CopyTask, copy_model


@pytest.fixture(scope="module")
def copy_eval():
    torch.set_num_threads(1)
    task = CopyTask()
    pm = copy_model(task)
    return pm, AblationEvaluator(pm, n=300, seed=0)


def test_true_circuit_is_faithful_complete_and_minimal(copy_eval):
    pm, ev = copy_eval
    r = evaluate_circuit(pm, ["a0.0@="], evaluator=ev)
    assert r.n == 300 and r.n_skipped == 0
    assert r.faithfulness_normalized["all"] >= 0.99 and r.faithfulness_normalized_ci["all"][0] >= 0.99
    assert r.faithfulness_normalized["copy"] >= 0.99
    assert r.normalized["accuracy"]["all"] == pytest.approx(1.0) and r.normalized["kl"]["all"] == pytest.approx(1.0)
    assert r.completeness["all"] == pytest.approx(1.0, abs=1e-6)
    assert r.minimality["a0.0@="]["all"] > 0.99 and r.minimality_ci["a0.0@="]["all"][0] > 0.99 and r.minimal
    means = r.means["logit_diff"]
    assert means["full"]["all"] > 0 > means["empty"]["all"]  # the source's answer wins when the head is resampled
    assert means["complement"]["all"] == pytest.approx(means["empty"]["all"])
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert "faithfulness_normalized" in d and "incompleteness" in d and "Marks" in d["definitions"]


def test_empty_and_irrelevant_circuits_explain_nothing(copy_eval):
    pm, ev = copy_eval
    for sites in ([], ["m0"], ["a0.0@3", "a0.0@4"]):
        f, ci = ev.normalized(ev.score(sites))
        assert abs(f["all"]) < 1e-6 and abs(ci["all"][0]) < 1e-6 and abs(ci["all"][1]) < 1e-6, sites
    r = evaluate_circuit(pm, ["m0@="], evaluator=ev)
    assert abs(r.faithfulness_normalized["all"]) < 1e-6 and not r.minimal


def test_residual_node_is_restored_clean(copy_eval):
    pm, ev = copy_eval
    r = evaluate_circuit(pm, ["x0.post@="], evaluator=ev)
    assert r.residual_sites == ["x0.post@="] and r.components == []
    assert r.faithfulness_normalized["all"] == pytest.approx(1.0, abs=1e-6)
    assert r.minimality["x0.post@="]["all"] == pytest.approx(1.0, abs=1e-6)
    # embeddings are never ablated: an x0.pre site needs nothing and is listed as such
    r2 = evaluate_circuit(pm, ["a0.0@=", "x0.pre@2"], evaluator=ev)
    assert r2.never_ablated_sites == ["x0.pre@2"] and r2.faithfulness_normalized["all"] >= 0.99


def test_growth_finds_exactly_the_true_circuit_and_curves(copy_eval):
    pm, ev = copy_eval
    cands = named_components(ev)
    assert len(cands) == 2 * len(pm.task.position_names)
    g = grow_circuit(ev, [], cands, target=0.9)
    assert g.added == ["a0.0@="] and g.reached and g.ranking[0] == "a0.0@="
    assert g.steps[0]["faithfulness"]["all"] == pytest.approx(0.0, abs=1e-6)
    assert g.steps[-1]["site"] == "a0.0@=" and g.steps[-1]["faithfulness"]["all"] >= 0.99
    plot = g.plot_data()
    assert plot["xs"] == [0, 1] and len(plot["series"]["all"]) == 2
    c = faithfulness_curve(ev, g)
    assert c.order[0] == "a0.0@=" and c.order[-1] == "rest" and c.n_universe == len(cands) + 1
    assert c.ys[0] == pytest.approx(0.0, abs=1e-6) and c.ys[-1] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= c.cpr <= 1.0 and 0.0 <= c.cmd <= 1.0
    n = c.n_universe
    assert c.cpr == pytest.approx(1 - 0.5 / n, abs=1e-6) and c.cmd == pytest.approx(0.5 / n, abs=1e-6)
    json.dumps(g.to_dict(), allow_nan=False)
    json.dumps(c.to_dict(), allow_nan=False)


def test_edge_faithfulness_matches_node_faithfulness_on_copy_model(copy_eval):
    pm, ev = copy_eval
    for nodes in (["a0.0@="], ["a0.0@3", "m0@=", "a0.0@="], ["x0.post@="], ["a0.0@=", "x0.pre@2"]):
        e = edge_faithfulness(ev, nodes, complete_edges(ev, nodes))
        assert e.faithfulness_normalized["all"] == pytest.approx(ev.faithfulness(nodes)["all"], abs=1e-4), nodes
    # without its output edge the head reaches nothing
    assert abs(edge_faithfulness(ev, ["a0.0@="], []).faithfulness_normalized["all"]) < 1e-6
    # edges that cannot carry anything are listed with the reason (or raise when strict)
    bad = [("x0.pre@2", "a0.0@="), ("a0.0@=", "out:copy"), ("a0.0@=", "out:nope"), ("m0@=", "a0.0@=")]
    e = edge_faithfulness(ev, ["a0.0@=", "x0.pre@2", "m0@="], bad)
    assert e.edges == [["a0.0@=", "out:copy"]] and len(e.ignored_edges) == 3
    assert e.faithfulness_normalized["all"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(CircuitkitError, match="written after"):
        edge_faithfulness(ev, ["a0.0@=", "m0@="], [("m0@=", "a0.0@=")], strict=True)


def test_tiny_model_aligned_sources_cis_and_edges(tiny_addition_model):
    torch.set_num_threads(1)
    pm = tiny_addition_model
    task = pm.task
    ev = AblationEvaluator(pm, n=150, seed=1, n_boot=500)
    assert ev.n + ev.n_skipped == 150
    for b, s in zip(ev.inputs, ev.sources):
        assert b != s and task.layout(task.tokens(b)) == task.layout(task.tokens(s))
        assert len(task.tokens(b, pad=False)) == len(task.tokens(s, pad=False))
    sites = ["a0.1@=", "m0@=", "a1.0@=", "m1@=", "a1.2@A1", "x0.post@F2", "m0@F2"]
    r = evaluate_circuit(pm, sites, evaluator=ev, n_subsets=5)
    assert set(r.target_names) >= {"A1", "A2", "A3", "EOS"}
    for m in ("logit_diff", "accuracy", "kl"):
        for k, v in r.normalized[m].items():
            lo, hi = r.normalized_ci[m][k]
            if v is not None and not math.isnan(v):
                assert lo - 1e-9 <= v <= hi + 1e-9, (m, k, v, lo, hi)
    for v, ci in r.minimality_ci.items():
        lo, hi = ci["all"]
        assert lo - 1e-9 <= r.minimality[v]["all"] <= hi + 1e-9, v
    assert 0.0 <= r.incompleteness["max"]["all"] and r.completeness["all"] <= 1.0
    assert len(r.incompleteness["subsets"]) >= 2 + len(r.components)
    json.dumps(r.to_dict(), allow_nan=False)
    # the complete edge set reproduces node faithfulness, residual restores included
    edges = complete_edges(ev, sites)
    assert ("m0@F2", "a1.0@=") not in edges  # overridden by the restored x0.post@F2
    e = edge_faithfulness(ev, sites, edges, ci=False)
    node = ev.faithfulness(sites)
    for k in node:
        assert e.faithfulness_normalized[k] == pytest.approx(node[k], abs=1e-4), k
    # dropping edges changes the answer
    fewer = [x for x in edges if x[1] != "out:A1"]
    assert not np.isclose(edge_faithfulness(ev, sites, fewer, ci=False).faithfulness_normalized["A1"], node["A1"])
