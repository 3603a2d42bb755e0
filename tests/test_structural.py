"""The zero-ablation pass for what same-layout sources cannot see (``circuit/structural.py``), on the committed
tracr models (no tracr needed): tracr-reverse's length sub-circuit is constant at a fixed length and frac_prevs'
a1.0 reads only positions from the embeddings, so neither is in a circuit built from same-layout tests; the
pass must find exactly the program's missing components and edges, and nothing a same-layout test already sees."""
from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch

from circuitkit.circuit.graph import CircuitNode, add_site_node
from circuitkit.circuit.structural import structural_pass
from circuitkit.discovery.ground_truth import read_truth, score_against_truth
from circuitkit.models.checkpoint import load_probed
from circuitkit.patching import engine
from circuitkit.patching.engine import Patch
from circuitkit.patching.path import path_patch_to_site
from circuitkit.sites import parse_site
from circuitkit.verification.interchange import InterchangeVerifier

MODELS = Path(__file__).resolve().parents[1] / "case_studies" / "models"


def _graph(verifier: InterchangeVerifier, sites: list[tuple[str, tuple[str, ...]]]) -> nx.DiGraph:
    g = nx.DiGraph()
    for site, feats in sites:
        add_site_node(g, CircuitNode(site, feats), verifier.tokens[0], verifier)
    return g


@pytest.fixture(scope="module")
def reverse():
    pm = load_probed(MODELS / "tracr_reverse")
    return pm, InterchangeVerifier(pm, n_inputs=600, n_pairs=100, seed=0)


def test_zero_path_patching_into_the_unembedding_equals_zeroing_the_last_head(reverse):
    """Independent check of ``path_patch_to_site(source_ids=None)``: a3.0 is the last component, so its direct
    path into the final residual stream at x1 is all of its effect there."""
    pm, verifier = reverse
    ids = verifier.ids[:40]
    sender, receiver = parse_site("a3.0@x1"), parse_site("x3.post@x1")
    path = path_patch_to_site(pm, ids, None, sender, receiver, through_bundle=False)
    pos = pm.task.position_indices(ids, "x1")
    _, cache = pm.runner.run(ids, cache=[sender.hook_name], return_logits=False)
    node = engine.run(pm.runner, ids, [Patch(sender, pos, torch.zeros_like(sender.select(cache[sender.hook_name], pos)))])
    rows = torch.arange(len(ids))
    assert torch.allclose(path[rows, pos], node[rows, pos], atol=1e-4)
    assert (path[rows, pos].argmax(-1) != pm.runner.logits(ids)[rows, pos].argmax(-1)).any()  # it matters


def test_the_pass_finds_the_length_sub_circuit_that_same_length_sources_cannot_move(reverse):
    pm, verifier = reverse
    sites = [(f"x0.pre@x{k}", ("tokens",)) for k in (1, 2)] + [(f"a3.0@x{k}", ("reverse_1",)) for k in (1, 2)]
    g = _graph(verifier, sites)
    tests = structural_pass(verifier, g, min_edge=0.1, n_pairs=100, seed=0)
    added = {n for n, d in g.nodes(data=True) if d.get("structural")}
    assert {"m0@x1", "m1@x1", "m2@x1", "m0@x2", "m1@x2", "m2@x2"} <= added
    assert {parse_site(n).layer for n in added} <= {0, 1, 2}  # the program's length and index arithmetic only
    chain = [("m0@x1", "m1@x1"), ("m1@x1", "m2@x1"), ("m2@x1", "a3.0@x1"), ("x0.pre@x1", "m0@x1")]
    assert all(g.has_edge(a, b) and g.edges[a, b]["ablation"] == "zero" for a, b in chain)
    # controls: a3.0 moves under same-length resampling (no node test), the heads and MLP that write nothing are
    # never tested, and a path resampling sees (the tokens into a3.0's value) is left to the circuit's own test
    tested_nodes = {t.sender for t in tests if t.receiver is None}
    assert not tested_nodes & {"a3.0@x1", "a1.0@x1", "a2.0@x1", "m3@x1"}
    assert not any(t.sender == "x0.pre@x1" and t.receiver == "a3.0@x1" for t in tests)
    # every rejected node test had a chance: it was run on enough bases
    assert all(t.n >= 50 for t in tests if t.receiver is None)


def test_with_the_pass_frac_prevs_circuit_holds_every_compiled_edge():
    """a1.0's query and key read positions only from the embeddings: the pass adds emb -> a1.0, and the circuit's
    edges then equal the program's (P = R = 1 against the full truth)."""
    model = MODELS / "tracr_frac_prevs"
    pm, truth = load_probed(model), read_truth(model)
    verifier = InterchangeVerifier(pm, n_inputs=600, n_pairs=100, seed=0)
    sites = [(f"x0.pre@x{k}", ("tokens",)) for k in (1, 2, 3)] + [(f"m0@x{k}", ("map_3",)) for k in (1, 2, 3)] + \
            [(f"a1.0@x{k}", ("frac_prevs_1",)) for k in (1, 2, 3)]
    g = _graph(verifier, sites)
    base_edges = [("x0.pre@x2", "m0@x2"), ("m0@x2", "a1.0@x2"), ("a1.0@x2", "out:y2")]
    tests = structural_pass(verifier, g, min_edge=0.1, n_pairs=100, seed=0)
    assert not [n for n, d in g.nodes(data=True) if d.get("structural")]  # nothing constant matters here
    assert g.has_edge("x0.pre@x2", "a1.0@x2") and g.edges["x0.pre@x2", "a1.0@x2"]["kind"] == "structural"
    assert not g.has_edge("x0.pre@x2", "m0@x2")  # the tokens into m0 move under resampling: not retested
    edges = [{"source": a, "target": b} for a, b in g.edges] + [{"source": a, "target": b} for a, b in base_edges]
    nodes = [{"id": n, "kind": "site", "features": list(d["features"])} for n, d in g.nodes(data=True)]
    moved = {c: 1.0 for c in truth["components"]}
    score = score_against_truth(truth, moved, nodes, edges)
    assert score.edges["full"] == {"precision": 1.0, "recall": 1.0, "missed": [], "extra": []}
    assert any(t.kept for t in tests) and not all(t.kept for t in tests)


def test_split_inputs_name_the_query_key_or_value_and_the_graph_edges_equal_the_program():
    """With ``split_inputs`` each edge into a head records which input carries it: m0 → a1.0 through the value
    (same-layout tests), the embeddings → a1.0 through query and key (zero ablation: positions only).  Converted
    to the MIB edge graph, the circuit's edges are then exactly the compiled ones."""
    from circuitkit.circuit.graph import build_circuit
    from circuitkit.discovery.edge_graph import EdgeGraph
    from circuitkit.discovery.problem import circuit_edges, truth_mask

    model = MODELS / "tracr_frac_prevs"
    pm, truth = load_probed(model), read_truth(model)
    verifier = InterchangeVerifier(pm, n_inputs=600, n_pairs=100, seed=0)
    nodes = [CircuitNode("x0.pre@x2", ("tokens",)), CircuitNode("m0@x2", ("map_3",)),
             CircuitNode("a1.0@x2", ("frac_prevs_1",), ("y2",))]
    g = build_circuit(verifier, nodes, min_edge=0.1, n_pairs=100, split_inputs=True)
    assert g.edges["m0@x2", "a1.0@x2"]["inputs"] == "v"
    structural_pass(verifier, g, min_edge=0.1, n_pairs=100, seed=0, split_inputs=True)
    assert g.edges["x0.pre@x2", "a1.0@x2"]["inputs"] == "q+k"
    graph = EdgeGraph.of_model(pm.runner)
    circuit = {"nodes": [{"id": n, "kind": d["kind"]} for n, d in g.nodes(data=True)],
               "edges": [{"source": a, "target": b, **d} for a, b, d in g.edges(data=True)]}
    keep, _ = circuit_edges(graph, circuit)
    assert torch.equal(keep, truth_mask(graph, truth))
    coarse = {"nodes": circuit["nodes"], "edges": [{k: v for k, v in e.items() if k != "inputs"}
                                                   for e in circuit["edges"]]}
    assert int(circuit_edges(graph, coarse)[0].sum()) > int(keep.sum())  # every edge between its components
