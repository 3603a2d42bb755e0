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
from circuitkit.types import Node
from tests.groundtruth_copy import CopyTask, copy_model
from tests.random_models import SHAPES, random_model


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


def _same_mask(a, b) -> bool:
    return torch.equal(a.heads, b.heads) and torch.equal(a.mlps, b.mlps)


def test_residual_node_is_a_live_bundle(copy_eval):
    pm, ev = copy_eval
    # x0.post@= stands for what is written at "=" up to layer 0's output: a0.0@= and m0@=, computed live
    assert _same_mask(ev.mask(["x0.post@="]), ev.mask(["a0.0@=", "m0@="]))
    assert [str(c) for c in ev.bundle("x0.post@=")] == ["a0.0@=", "m0@="]
    assert [str(c) for c in ev.bundle("x0.mid@=")] == ["a0.0@="]
    r = evaluate_circuit(pm, ["x0.post@="], evaluator=ev)
    assert r.residual_sites == ["x0.post@="] and r.components == []
    assert r.bundles == {"x0.post@=": ["a0.0@=", "m0@="]}
    assert r.faithfulness_normalized["all"] == pytest.approx(1.0, abs=1e-6)  # it contains the true head
    assert r.minimality["x0.post@="]["all"] == pytest.approx(1.0, abs=1e-6)
    assert r.completeness["all"] == pytest.approx(1.0, abs=1e-6)
    # a component already inside a bundle of the circuit adds nothing: minimality 0, and the report shows it
    r3 = evaluate_circuit(pm, ["x0.post@=", "a0.0@="], evaluator=ev)
    assert r3.minimality["a0.0@="]["all"] == pytest.approx(0.0, abs=1e-9) and not r3.minimal
    assert r3.minimality["x0.post@="]["all"] == pytest.approx(0.0, abs=1e-9)  # a0.0@= still covers the head
    # x0.pre is embeddings only (never ablated): it covers nothing and explains nothing on its own
    assert _same_mask(ev.mask(["x0.pre@2"]), ev.none_mask())
    r0 = evaluate_circuit(pm, ["x0.pre@2"], evaluator=ev)
    assert r0.never_ablated_sites == ["x0.pre@2"] and r0.residual_sites == []
    assert abs(r0.faithfulness_normalized["all"]) < 1e-6
    r2 = evaluate_circuit(pm, ["a0.0@=", "x0.pre@2"], evaluator=ev)
    assert r2.never_ablated_sites == ["x0.pre@2"] and r2.faithfulness_normalized["all"] >= 0.99


def test_residual_node_is_not_restored(tiny_addition_model):
    """x1.post@A1 scores exactly like its bundle's components (nothing restored clean), not like the
    clean full model."""
    torch.set_num_threads(1)
    pm = tiny_addition_model
    ev = AblationEvaluator(pm, n=120, seed=2, n_boot=50)
    bundle = [f"a0.{h}@A1" for h in range(4)] + ["m0@A1"] + [f"a1.{h}@A1" for h in range(4)] + ["m1@A1"]
    assert [str(c) for c in ev.bundle("x1.post@A1")] == bundle
    assert _same_mask(ev.mask(["x1.post@A1"]), ev.mask(bundle))
    a, b = ev.score(["x1.post@A1"]), ev.score(bundle)
    assert np.array_equal(a.logit_diff, b.logit_diff) and np.array_equal(a.kl, b.kl)
    f, g = ev.faithfulness(["x1.post@A1"]), ev.faithfulness(bundle)
    assert f.keys() == g.keys() and all(f[k] == g[k] or (math.isnan(f[k]) and math.isnan(g[k])) for k in f)
    # the old semantics (restore the clean value) would give A2 (read at A1, the last layer) the full model's
    # logit differences exactly; live, the bundle reads ablated other positions and differs from them (raw
    # logit differences: on this briefly trained model A2's normalisation is undefined, m(M) <= m(∅))
    on_a2 = ev.pair_target == ev.target_names.index("A2")
    restored = ev.run(ev.mask(bundle), ["x1.post@A1"])
    assert np.allclose(restored.logit_diff[on_a2], ev.full.logit_diff[on_a2], atol=1e-4)
    assert not np.allclose(a.logit_diff[on_a2], ev.full.logit_diff[on_a2], atol=1e-3)


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
    for nodes in (["a0.0@="], ["a0.0@3", "m0@=", "a0.0@="], ["x0.post@="], ["a0.0@=", "x0.pre@2"],
                  ["x0.post@=", "a0.0@="], ["x0.mid@3", "x0.post@="]):
        e = edge_faithfulness(ev, nodes, complete_edges(ev, nodes))
        assert e.faithfulness_normalized["all"] == pytest.approx(ev.faithfulness(nodes)["all"], abs=1e-4), nodes
    # a residual node is expanded into its bundle (de-duplicated with an explicit component node)
    e = edge_faithfulness(ev, ["x0.post@=", "a0.0@="], complete_edges(ev, ["x0.post@=", "a0.0@="]), ci=False)
    assert e.expanded_nodes == {"x0.post@=": ["a0.0@=", "m0@="]}
    assert ["a0.0@=", "m0@="] in e.expanded_edges and ["a0.0@=", "out:copy"] in e.expanded_edges
    # the bundle's output edge alone carries the head at "=": without it nothing reaches the answer
    assert edge_faithfulness(ev, ["x0.post@="], [("x0.post@=", "out:copy")],
                             ci=False).faithfulness_normalized["all"] == pytest.approx(1.0, abs=1e-4)
    assert abs(edge_faithfulness(ev, ["x0.post@="], [], ci=False).faithfulness_normalized["all"]) < 1e-6
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
    # the complete edge set reproduces node faithfulness with residual nodes (live bundles) present
    edges = complete_edges(ev, sites)
    e = edge_faithfulness(ev, sites, edges, ci=False)
    assert e.expanded_nodes == {"x0.post@F2": [f"a0.{h}@F2" for h in range(4)] + ["m0@F2"]}
    node = ev.faithfulness(sites)
    for k in node:
        assert e.faithfulness_normalized[k] == pytest.approx(node[k], abs=1e-4, nan_ok=True), k
    # overlapping bundles (x0.post in x1.mid), a position-less bundle and an explicit head inside a bundle
    for more in (["x1.mid@=", "x0.post@=", "a1.2@=", "m1@A1"], ["x0.mid", "x1.post@A1", "a1.0@="]):
        e2 = edge_faithfulness(ev, more, complete_edges(ev, more), ci=False)
        node2 = ev.faithfulness(more)
        for k in node2:
            assert e2.faithfulness_normalized[k] == pytest.approx(node2[k], abs=1e-4, nan_ok=True), (more, k)
    # dropping edges changes the answer
    fewer = [x for x in edges if x.receiver != Node.output("A1")]
    assert not np.isclose(edge_faithfulness(ev, sites, fewer, ci=False).faithfulness_normalized["A1"], node["A1"])


def test_growth_and_curve_with_a_residual_start_site(copy_eval):
    pm, ev = copy_eval
    cands = named_components(ev)
    g = grow_circuit(ev, ["x0.post@="], cands, target=0.9)
    assert g.reached and g.added == [] and g.covered == ["a0.0@=", "m0@="]
    assert "a0.0@=" not in g.ranking and g.faithfulness["all"] == pytest.approx(1.0, abs=1e-6)
    c = faithfulness_curve(ev, g)
    # the bundle's components are the order's prefix, one node of the universe each
    assert c.order[:2] == ["a0.0@=", "m0@="] and c.excluded == [] and c.n_universe == len(cands) + 1
    assert c.ys[1] == pytest.approx(1.0, abs=1e-6)
    assert faithfulness_curve(ev, start_sites=["x0.pre@2"]).excluded == ["x0.pre@2"]


def _runs(ev: AblationEvaluator) -> list:
    """What growth, curves, pruning, completeness and single effects ask for: prefixes of one order of
    components, each prefix minus one node, complements, and single-node ablations of the full model."""
    comps = named_components(ev)
    order = [comps[i] for i in np.random.default_rng(0).permutation(len(comps))][:12]
    out = []
    for k in (0, 3, 6, 12):
        out.append((order[:k], (), False))
        out.append((order[:k], (), True))
    out += [(order[:12], [v], False) for v in order[:12:4]]
    out += [([v], (), True) for v in order[:12:3]]
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache_mib", [512.0, 0.0])
def test_incremental_ablation_runs_equal_the_full_recomputation(shape, cache_mib):
    """Starting at the deepest block input a remembered run shares and computing the last block at the
    target rows only gives the scores of the full forward pass, for GPT-2 with 1-3 layers, a
    parallel-residual NeoX and a gated grouped-query Llama, with and without room to remember runs."""
    torch.set_num_threads(1)
    pm = random_model("addition", **shape)
    fast = AblationEvaluator(pm, n=48, seed=0, batch_size=20, resid_cache_mib=cache_mib)
    full = AblationEvaluator(pm, n=48, seed=0, batch_size=20, incremental=False)
    assert np.abs(full.full.logit_diff - full.empty.logit_diff).max() > 1e-2  # ablation moves the metric
    for a, b in ((fast.full, full.full), (fast.empty, full.empty)):
        assert np.abs(a.logit_diff - b.logit_diff).max() <= 1e-4
    for keep, ablate, complement in _runs(full):
        a, b = fast.score(keep, ablate, complement), full.score(keep, ablate, complement)
        assert np.abs(a.logit_diff - b.logit_diff).max() <= 1e-4, (keep, ablate, complement)
        assert np.abs(a.kl - b.kl).max() <= 1e-4
        assert np.abs(a.accuracy - b.accuracy).sum() <= 1  # an argmax may flip on a near-tie, no more
    last = fast.L - 1
    m = ~fast.mask([f"m{last}@A1"])  # the full model with one last-layer MLP ablated
    start = fast._refs.best_start(m.heads, m.mlps)[0]
    assert start == (last if cache_mib else 0)  # remembered: only the last block runs


def test_an_answer_the_full_model_does_no_better_on_is_undefined_and_left_out_of_all(tiny_addition_model):
    """m(M) <= m(∅) on an answer makes (m(C) − m(∅)) / (m(M) − m(∅)) meaningless (addition's EOS once read
    1.674): that answer is undefined (NaN, "undefined" in reports) and "all" pools the other answers only."""
    import dataclasses

    torch.set_num_threads(1)
    ev = AblationEvaluator(tiny_addition_model, n=120, seed=3, n_boot=50)
    sites = ["a0.1@=", "m0@=", "a1.0@=", "m1@="]
    before, defined = ev.normalized(ev.score(sites))[0], ev.defined_targets()
    assert defined and all(not math.isnan(before[k]) for k in defined)
    assert all(math.isnan(before[k]) for k in ev.target_names if k not in defined)  # this model has some too
    t0 = defined[0]
    j0 = ev.target_names.index(t0)
    on_t0 = ev.pair_target == j0
    ld = ev.empty.logit_diff.copy()
    ld[on_t0] = ev.full.logit_diff[on_t0] + 1.0  # ablating everything now "helps" on t0
    ev.empty = dataclasses.replace(ev.empty, logit_diff=ld)
    assert ev.defined_targets() == defined[1:]
    point, ci = ev.normalized(ev.score(sites))
    assert math.isnan(point[t0]) and all(math.isnan(x) for x in ci[t0])
    for k in defined[1:]:
        assert point[k] == pytest.approx(before[k], abs=1e-12)  # the others are untouched
    c, m, e = ev.score(sites).logit_diff, ev.full.logit_diff, ld
    keep = np.isin(ev.pair_target, [ev.target_names.index(k) for k in defined[1:]])
    want = (c[keep].mean() - e[keep].mean()) / (m[keep].mean() - e[keep].mean())
    assert point["all"] == pytest.approx(want, rel=1e-9) and ci["all"][0] <= point["all"] <= ci["all"][1]
