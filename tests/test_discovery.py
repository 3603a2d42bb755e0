"""Circuit-discovery baselines (``circuitkit.discovery``): each method checked against an independent computation."""
from __future__ import annotations

import json

import pytest
import torch

from circuitkit.cli import main
from circuitkit.discovery.compare import faithfulness, mib_curve, roc_auc
from circuitkit.discovery.edge_graph import EdgeGraph
from circuitkit.discovery.masked import circuit_metric
from circuitkit.discovery.methods import acdc_order, discover
from circuitkit.discovery.problem import build_problem, circuit_edges
from circuitkit.errors import CircuitkitError
from circuitkit.patching.attribution import attribute
from circuitkit.patching.path import path_patch


@pytest.fixture(scope="module")
def problem(tiny_addition_model):
    p, record = build_problem(tiny_addition_model, n=24, seed=3)
    return p, record


def test_edge_graph_matches_mib_counts_and_round_trips_its_json():
    g = EdgeGraph(2, 4)
    # MIB: n_forward = 1 + L (H + 1), n_backward = L (3H + 1) + 1; edges: every earlier writer into every reader
    assert g.shape == (11, 27)
    assert g.n_edges == (12 * 1 + 5) + (12 * 6 + 10) + 11
    assert "a0.h1->a1.h2<k>" in g.edge_names() and "a1.h0->m1" in g.edge_names()
    assert "a1.h0->a1.h1<q>" not in g.edge_names()  # same layer: no edge
    scores = torch.randn(g.shape) * g.real
    keep = g.top_edges(scores, 20)
    s2, k2 = g.from_mib_json(json.loads(json.dumps(g.to_mib_json(scores, keep))))
    assert torch.equal(k2, keep) and torch.allclose(s2, scores)
    assert int(EdgeGraph(2, 4, parallel=True).n_edges) == g.n_edges - 2 * 4  # a parallel MLP reads no head of its layer


def test_pruning_drops_edges_that_lead_nowhere():
    g = EdgeGraph(2, 1)
    keep = g.empty()
    keep[g.edge_index("input->a0.h0<q>")] = True  # a0.h0 reads, but sends nowhere
    keep[g.edge_index("input->logits")] = True
    pruned = g.prune(keep)
    assert pruned[g.edge_index("input->logits")] and not pruned[g.edge_index("input->a0.h0<q>")]


@torch.no_grad()
def test_full_circuit_is_the_model_and_empty_circuit_is_the_ablated_run(problem, tiny_addition_model):
    p, _ = problem
    g, r = p.graph, tiny_addition_model.runner
    both = circuit_metric(r, g, p.base, p.ablated, torch.stack([g.full(), g.empty()]), p.ctx, "logit")
    from circuitkit.patching.metrics import evaluate
    assert torch.allclose(both[0], evaluate("logit", r.logits(p.base), p.ctx)[0], atol=1e-4)
    # every edge ablated: each sender reads what it read on the source, so the run is the source's own
    from circuitkit.discovery.problem import aligned_pairs
    _, sources = aligned_pairs(tiny_addition_model, 24, 3)
    src_logits = r.logits(tiny_addition_model.task.encode(sources))
    assert torch.allclose(both[1], evaluate("logit", src_logits, p.ctx)[0], atol=1e-4)
    f = faithfulness(p, torch.stack([g.full(), g.empty()]))
    assert f[0].item() == pytest.approx(1.0, abs=1e-5) and f[1].item() == pytest.approx(0.0, abs=1e-5)


def test_eap_equals_activation_difference_times_gradient_from_attribution(problem, tiny_addition_model):
    """EAP (one backward through the edge mask) against attribution patching's local vector-Jacobian products."""
    p, _ = problem
    pm = tiny_addition_model
    res = discover(p, "eap")
    bases = [pm.task.decode(row) for row in p.base]
    # the same sources build_problem drew (its record keeps the first five; redraw them all the same way)
    from circuitkit.discovery.problem import aligned_pairs
    b2, sources = aligned_pairs(pm, 24, 3)
    assert b2 == bases
    att = attribute(pm, bases, sources, "logit_diff")
    g = p.graph
    for e, v in att.edge_means().items():
        sender, receiver = str(e.sender), str(e.receiver)
        if sender == "pos":
            continue  # same-length pairs: the positions do not differ (their edges are 0)
        s = "input" if sender == "emb" else g.senders[[x.node.name for x in g.senders].index(sender)].name
        r = next(x.name for x in g.receivers if x.spelling == receiver)
        # attribution estimates m(patched) - m(base); an edge score is the drop, m(base) - m(patched)
        assert res.scores[g.sender_index[s], g.receiver_index[r]].item() == pytest.approx(-v, abs=1e-4, rel=1e-3)


def test_integrated_gradients_with_one_step_equal_eap(problem):
    p, _ = problem
    base = discover(p, "eap").scores
    for method in ("eap-ig-inputs", "eap-ig-activations"):
        assert torch.allclose(discover(p, method, steps=1).scores, base, atol=1e-5)
    five = discover(p, "eap-ig-inputs", steps=5).scores
    assert not torch.allclose(five, base, atol=1e-3)  # more steps do integrate along the path


def test_exact_edge_scores_equal_path_patching(problem, tiny_addition_model):
    p, _ = problem
    pm = tiny_addition_model
    res = discover(p, "exact")
    from circuitkit.discovery.problem import aligned_pairs
    bases, sources = aligned_pairs(pm, 24, 3)
    for sender, receiver, inp, name in [("a0.1", "a1.2", "k", "a0.h1->a1.h2<k>"), ("m0", "a1.0", "q", "m0->a1.h0<q>"),
                                        ("a1.3", "logits", "resid", "a1.h3->logits"), ("a0.2", "m1", "resid", "a0.h2->m1")]:
        pp = path_patch(pm, bases, sources, sender, receiver, inp)
        assert res.scores[p.graph.edge_index(name)].item() == pytest.approx(float(pp.effect.mean()), abs=1e-4), name


def test_exact_scores_a_chosen_set_of_edges_alone(problem):
    p, _ = problem
    g = p.graph
    whole = discover(p, "exact")
    some = [g.edge_index(n) for n in ("a0.h1->a1.h2<k>", "m0->a1.h0<q>", "a1.h3->logits")]
    part = discover(p, "exact", edges=some, progress=False)
    chosen = torch.zeros(g.shape, dtype=torch.bool)
    for i, j in some:
        chosen[i, j] = True
    assert torch.allclose(part.scores[chosen], whole.scores[chosen], atol=1e-6)
    assert part.scores[~chosen].abs().max() == 0 and whole.scores[chosen].abs().min() > 0
    assert part.settings["edges"] == 3
    first = p.clean()
    p.forget_clean()  # the next method pays for its own clean run (benchmarks time it), with the same result
    assert p.clean() is not first and torch.equal(p.clean().outputs, first.outputs)
    assert torch.equal(discover(p, "exact", edges=some, progress=False).scores, part.scores)
    with pytest.raises(CircuitkitError, match="not edges of the graph"):
        discover(p, "exact", edges=[(g.shape[0] - 1, 0)])  # the last layer's MLP cannot feed block 0


@torch.no_grad()
@pytest.mark.parametrize("shape", [dict(n_layer=3, n_head=2, d_model=32),
                                   dict(arch="gpt_neox", n_layer=3, n_head=2, d_model=32)], ids=["gpt2", "neox"])
def test_a_circuit_run_from_its_first_changed_block_equals_the_whole_run(shape):
    """Circuits that keep every edge into the blocks below ``start_of`` run from there on the base's clean
    stream (exact scoring, ACDC); the metric equals the run from the embeddings, and a start past an ablated edge
    is refused."""
    from circuitkit.discovery.masked import EdgeMask, clean_run, start_of
    from tests.random_models import random_model
    pm = random_model("addition", **shape)
    p, _ = build_problem(pm, n=8, seed=1)
    g, gen = p.graph, torch.Generator().manual_seed(0)
    layer = torch.tensor([min(r.layer, g.n_layers - 1) for r in g.receivers])
    masks = []
    for first in (1, 2, 2, 3):  # drop random edges into blocks >= first (3: the logits only)
        drop = (torch.rand(g.shape, generator=gen) < 0.3) & (layer >= first)[None, :] & g.real
        masks.append(g.full() & ~drop)
    keep = torch.stack(masks)
    assert [start_of(g, k[None]) for k in keep] == [1, 2, 2, 2]  # the logits' edges start at the last block
    clean = clean_run(pm.runner, g, p.base)
    whole = circuit_metric(pm.runner, g, p.base, p.ablated, keep, p.ctx, "logit_diff", chunk=1)
    started = circuit_metric(pm.runner, g, p.base, p.ablated, keep, p.ctx, "logit_diff", chunk=1, clean=clean)
    assert torch.allclose(started, whole, atol=1e-5)
    together = circuit_metric(pm.runner, g, p.base, p.ablated, keep, p.ctx, "logit_diff", chunk=4, clean=clean)
    assert torch.allclose(together, whole, atol=1e-5)  # circuits that ablate different senders, in one forward
    assert not torch.allclose(whole[0], whole[1], atol=1e-3)  # the masks do change the output
    with pytest.raises(ValueError, match="earlier block"):
        EdgeMask(g, keep[0], p.ablated, start=2, clean=clean)


def test_acdc_with_tau_zero_keeps_exactly_the_edges_whose_removal_raised_kl(problem):
    p, _ = problem
    res = discover(p, "acdc", tau=0.0)
    g = p.graph
    order = acdc_order(g)
    assert len(order) == g.n_edges and order[0][1] == g.receiver_index["logits"]
    for i, j in order:
        assert bool(res.kept[i, j]) == (res.scores[i, j].item() >= 0.0)
    kl = circuit_metric(p.runner, g, p.base, p.ablated, res.kept, p.kl_context(), "kl").mean().item()
    assert kl == pytest.approx(res.settings["kl"], abs=1e-6)
    loose = discover(p, "acdc", tau=1e9)
    assert int(loose.kept.sum()) == 0  # every removal passes an infinite threshold


def test_mib_curve_reaches_one_with_every_edge_and_roc_auc_ranks(problem):
    p, _ = problem
    curve = mib_curve(p, discover(p, "eap").scores)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4) and curve.n_edges[-1] <= p.graph.n_edges
    g = EdgeGraph(1, 1)
    truth = g.empty()
    truth[g.edge_index("input->logits")] = True
    scores = torch.zeros(g.shape)
    scores[g.edge_index("input->logits")] = 5.0
    assert roc_auc(g, scores, truth) == 1.0 and roc_auc(g, -scores * 0, truth) == 0.5


def test_circuitkit_circuit_becomes_edges_between_its_components():
    g = EdgeGraph(2, 2)
    circuit = {"nodes": [{"id": "x0.pre@Q"}, {"id": "a0.1@Q"}, {"id": "x1.mid@:"}, {"id": "m1@:"},
                         {"id": "out:count", "kind": "output"}],
               "edges": [{"source": "a0.1@Q", "target": "m1@:", "effect": 0.7}]}
    keep, scores = circuit_edges(g, circuit)
    names = {n for n in g.edge_names() if keep[g.edge_index(n)]}
    assert names == {"input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "input->m1", "a0.h1->m1",
                     "input->logits", "a0.h1->logits", "m1->logits"}
    assert scores[g.edge_index("a0.h1->m1")] == pytest.approx(0.7)
    bundled, _ = circuit_edges(g, circuit, bundles=True)  # x1.mid@: stands for every layer-0 head, m0 and a1.*
    assert bundled[g.edge_index("m0->a1.h0<v>")] and not keep[g.edge_index("m0->a1.h0<v>")]
    assert torch.equal(bundled & keep, keep)


def test_a_circuit_that_keeps_every_edge_is_not_called_at_least_as_faithful():
    """At the whole graph every method is the full model: the verdict says the comparison says nothing there."""
    from circuitkit.discovery.harness import verdict
    from circuitkit.pipeline.report import verdict_text

    def cmp(n_own: int) -> dict:
        return {"n_edges_total": 110, "circuitkit_edges": n_own,
                "rows": [{"method": "circuitkit", "edges": n_own, "faithfulness": 1.0},
                         {"method": "acdc", "faithfulness_at_circuitkit_size": 0.97}]}

    whole, part = verdict(cmp(110)), verdict(cmp(90))
    assert whole["whole_graph"] and whole["at_least_best"] is None and whole["at_least_as_close"] is None
    assert not part["whole_graph"] and part["at_least_best"]
    assert "says nothing" in verdict_text(whole) and "at least as faithful" not in verdict_text(whole)
    assert "at least as faithful" in verdict_text(part)


def test_discover_and_compare_commands(tiny_counting_model, tmp_path, capsys):
    model = str(tiny_counting_model.path)
    out = tmp_path / "disc"
    assert main(["discover", model, "--method", "eap", "acdc", "--n", "8", "--out", str(out)]) == 0
    d = json.loads((out / "acdc.json").read_text())
    assert set(d) >= {"cfg", "nodes", "edges", "circuitkit"} and (out / "manifest.json").is_file()
    assert main(["compare", model, str(out), "--n", "8", "--out", str(tmp_path / "cmp"), "--json"]) == 0
    capsys.readouterr()
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert {r["method"] for r in cmp["rows"]} == {"eap", "acdc"} and (tmp_path / "cmp" / "comparison.png").is_file()
    # bad input: a clear error, exit 2, nothing written
    assert main(["discover", model, "--method", "eap", "--n", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--n" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["discover", model, "--method", "eap", "--ablation", "bogus", "--out", str(tmp_path / "bad")]) == 2
    assert "resample, mean, zero" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert main(["compare", model, str(tmp_path / "junk.json"), "--n", "8", "--out", str(tmp_path / "c2")]) == 2
    assert "neither a discovery file" in capsys.readouterr().err
