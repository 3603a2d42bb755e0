"""Ground truth: on a model whose mechanism is forced by construction, the pipeline must recover
exactly the true (site, feature) — precision = recall = 1.0 — and the null controls nothing."""
from __future__ import annotations

import random

import pytest
import torch

from circuitkit.hypotheses.preimage_sources import PoolPreimage
from circuitkit.hypotheses.scoring import generate_hypotheses
from circuitkit.models.train import random_init_like
from circuitkit.sites import parse_site
from circuitkit.verification.interchange import InterchangeVerifier
from circuitkit.verification.report import verify_hypotheses
from tests.groundtruth_copy import CopyTask, copy_model

#: the true path: the embedding at position 2 (x0.pre@2) -> head a0.0 at "=" -> the answer.
#: Decoys: a0.0@3 and a0.0@4 carry tok@2 too but never reach the answer; m0 is exactly zero;
#: x0.pre@= is the constant "=" embedding; x0.pre@1 carries tok@1, which the head ignores.
SITES = ["a0.0@=", "a0.0@3", "a0.0@4", "m0@=", "x0.pre@=", "x0.pre@2", "x0.pre@1"]
TRUTH = {("a0.0@=", "tok@2"), ("x0.pre@2", "tok@2")}


@pytest.fixture(scope="module")
def copy():
    torch.set_num_threads(1)
    task = CopyTask()
    return task, copy_model(task)


def _pipeline(pm, task, seed=0):
    queries = task.generate(random.Random(123 + seed), 40)
    src = PoolPreimage(pm, pool_size=3000, seed=seed)
    rep = generate_hypotheses(pm, [parse_site(s) for s in SITES], queries, src, seed=seed)
    ver = InterchangeVerifier(pm, n_inputs=2000, seed=seed)
    return rep, verify_hypotheses(ver, rep.hypotheses)


def test_model_solves_task_by_construction(copy):
    task, pm = copy
    ids = task.encode(task.split("test"))
    pred = pm.runner.logits(ids)[:, 5].argmax(-1)
    assert torch.equal(pred, ids[:, 6])


def test_pipeline_recovers_exactly_the_true_mechanism(copy):
    task, pm = copy
    rep, vr = _pipeline(pm, task)
    accepted = {(h.site, h.feature) for h in rep.accepted()}
    # the informational step finds tok@2 wherever the head has copied it, tok@1 where it sits, nothing
    # at the constant or zero sites; other accepted features are token counts up to a position that
    # holds x2 (partial information about x2, e.g. count(a) among x1 x2 at x0.pre@2)
    assert TRUTH | {("a0.0@3", "tok@2"), ("a0.0@4", "tok@2"), ("x0.pre@1", "tok@1")} <= accepted
    assert not {(s, f) for s, f in accepted if s in ("m0@=", "x0.pre@=")}
    assert {f for s, f in accepted if s == "x0.pre@1"} == {"tok@1"}  # counts of x1 are implied by tok@1
    implied = [h for h in rep.hypotheses if h.site == "x0.pre@1" and h.implied_by == "tok@1"]
    assert implied and all(h.feature.startswith("count(") for h in implied)
    assert all(f.startswith("count(") for s, f in accepted
               if (s, f) not in TRUTH | {("a0.0@3", "tok@2"), ("a0.0@4", "tok@2"), ("x0.pre@1", "tok@1")})
    h = next(h for h in rep.accepted() if h.site == "a0.0@=")
    assert h.agreement > 0.99 and h.baseline < 0.3 and h.q_value < 1e-6 and h.examples
    assert "tok@p-3" in h.aliases  # the same partition of inputs, named by the matched position
    # the causal step keeps only the site that reaches the answer
    found = {(n.site, f) for n in vr.nodes for f in n.features}
    tp = len(found & TRUTH)
    precision = tp / len(found) if found else 0.0
    recall = tp / len(TRUTH)
    assert (precision, recall) == (1.0, 1.0), found
    node = next(n for n in vr.nodes if n.site == "a0.0@=")
    assert node.targets == ("copy",) and node.iia == pytest.approx(1.0) and not node.joint
    # both null controls ran beside every patched test and verified nothing; the true mechanism is learned
    summary = vr.to_dict()["controls_summary"]
    patched = [v for v in vr.verdicts if v.targets]
    assert summary["random_model"]["tested"] == summary["shuffled_feature"]["tested"] == len(patched)
    assert summary["random_model"]["verified"] == 0 and not vr.controls_verified
    assert all(not n.architectural for n in vr.nodes)
    # unpatched verdicts are exactly the features that predict no answer
    assert all("predicts no answer" in v.note for v in vr.verdicts if not v.targets)


def test_random_model_end_to_end_verifies_nothing(copy):
    task, pm = copy
    null = random_init_like(pm, seed=1)
    _, vr = _pipeline(null, task)
    assert vr.nodes == []
    assert not [v for v in vr.verdicts if v.verified]


def test_shuffled_feature_breaks_the_true_hypothesis(copy):
    task, pm = copy
    ver = InterchangeVerifier(pm, n_inputs=2000)
    real = ver.test("a0.0@=", ["tok@2"])
    shuf = ver.test("a0.0@=", ["tok@2"], condition="shuffled_feature", shuffle=True)
    assert real.verified and not shuf.verified
    r, s = real.targets[0], shuf.targets[0]
    assert r.effect.ci_low > 0.9 and abs(s.effect.mean) < 0.15
    assert s.iia is not None and s.iia.mean < 0.3  # chance is 1/8


def test_a_wrong_feature_is_rejected(copy):
    """tok@1 is not what the head carries: sources differing in it do not move the answer."""
    task, pm = copy
    ver = InterchangeVerifier(pm, n_inputs=2000)
    v = ver.test("a0.0@=", ["tok@1"])
    assert not v.verified and not v.necessary_targets


def test_circuit_graph_edges_faithfulness_and_exports(copy, tmp_path):
    import json

    import networkx as nx

    from circuitkit.circuit.evaluate import evaluate_circuit
    from circuitkit.circuit.export import export_all, from_json_dict
    from circuitkit.circuit.graph import build_circuit

    task, pm = copy
    _, vr = _pipeline(pm, task)
    ver = InterchangeVerifier(pm, n_inputs=1500)
    g = build_circuit(ver, vr.nodes)
    # embedding at 2 -> head at "=" (path patching) -> the answer; no shortcut edge from the embedding
    assert set(g.edges) == {("x0.pre@2", "a0.0@="), ("a0.0@=", "out:copy")}
    assert g.edges["x0.pre@2", "a0.0@="]["feature"] == "tok@2"
    assert g.edges["x0.pre@2", "a0.0@="]["ci_low"] > 0.9
    ev = evaluate_circuit(pm, [n.site for n in vr.nodes], n=400)
    assert ev.full["copy"] == 1.0 and ev.faithfulness["copy"] == pytest.approx(1.0)
    assert ev.completeness["copy"] > 0.95 and ev.minimal
    assert ev.empty["copy"] < 0.35  # resampling the head destroys the answer (chance 1/8)
    # x0.pre is the embedding, never ablated: nothing to restore (other residual sites are restored clean)
    assert ev.never_ablated_sites == ["x0.pre@2"] and ev.residual_sites == [] and ev.components == ["a0.0@="]
    assert ev.faithfulness_normalized["copy"] == pytest.approx(1.0)
    files = export_all(g, tmp_path, extra={"evaluation": ev.to_dict()})
    g2 = from_json_dict(json.loads(open(files["json"]).read()))
    assert set(g2.edges) == set(g.edges) and g2.nodes["a0.0@="]["features"] == ["tok@2"]
    gm = nx.read_graphml(files["graphml"])
    assert set(gm.edges) == set(g.edges) and gm.nodes["a0.0@="]["features"] == "tok@2"
    dot = open(files["dot"]).read()
    assert dot.startswith("digraph") and '"x0.pre@2" -> "a0.0@="' in dot
    assert open(files["png"], "rb").read(4) == b"\x89PNG" and "<svg" in open(files["svg"]).read()


def test_path_patching_does_not_invent_edges(copy):
    """x0.pre@1 carries tok@1, which the head ignores: no edge into a0.0@= from it."""
    from circuitkit.circuit.graph import edge_effects
    from circuitkit.verification.report import VerifiedNode

    task, pm = copy
    ver = InterchangeVerifier(pm, n_inputs=1500)
    sender = VerifiedNode("x0.pre@1", ("tok@1",), ("copy",), 0.0, None, False)
    res = edge_effects(ver, sender, "a0.0@=", ["copy"])
    assert res and res[0].effect == 0.0 and res[0].ci_low <= 0.0
    real = edge_effects(ver, VerifiedNode("x0.pre@2", ("tok@2",), ("copy",), 1.0, 1.0, False), "a0.0@=", ["copy"])
    assert real[0].effect == 1.0 and real[0].change_agree == 0.0 and real[0].iia == 1.0
    out = edge_effects(ver, VerifiedNode("a0.0@=", ("tok@2",), ("copy",), 1.0, 1.0, False), "out:copy", ["copy"])
    assert out[0].effect == 1.0 and out[0].iia == 1.0  # the head writes the answer straight into the logits


def test_decoder_preimage_adapter_splits_samples_at_eps(copy, monkeypatch):
    """DecoderPreimage turns an inversion (samples re-run by the inversion code) into members and
    near-miss baseline; ill-formed samples are kept but their features are undefined."""
    from types import SimpleNamespace

    import circuitkit.inversion.preimage as inv_mod
    from circuitkit.hypotheses.preimage_sources import DecoderPreimage

    task, pm = copy

    def fake_invert_text(td, site, text, **kw):
        same = "B" + "a" + text[2] + "cd=" + text[2] + "E"  # same x2: in the preimage
        other = "Bh" + ("a" if text[2] != "a" else "b") + "cd=hE"
        broken = "Bab"  # a decoder may produce partial inputs
        return SimpleNamespace(texts=[text, same, other, broken], positions=torch.tensor([5, 5, 5, 2]),
                               distances=torch.tensor([0.0, 0.02, 0.5, float("inf")]))

    monkeypatch.setattr(inv_mod, "invert_text", fake_invert_text)
    src = DecoderPreimage(SimpleNamespace(probed=pm), n_per_cell=4)
    queries = task.generate(random.Random(5), 12)
    qps = src.preimages(parse_site("a0.0@="), queries)
    assert all(len(q.members) == 1 and len(q.baseline) == 1 and q.position == 5 for q in qps)  # query itself dropped
    rep = generate_hypotheses(pm, [parse_site("a0.0@=")], queries, src)
    top = rep.hypotheses[0]
    assert top.feature == "tok@2" and top.agreement == 1.0 and top.baseline == 0.0 and top.accepted


def _reference_interchange_logits(pm, base_ids, source_ids, site):
    """An independent single-site interchange (one runner hook, no patching engine): the oracle below."""
    bpos = pm.task.position_indices(base_ids, site.position)
    spos = pm.task.position_indices(source_ids, site.position)
    _, cache = pm.runner.run(source_ids, cache=[site.hook_name], return_logits=False)
    value = site.select(cache[site.hook_name], spos)

    def hook(act):
        act = act.clone()
        rows = torch.arange(act.shape[0])
        if site.head is not None:
            act[rows, bpos, site.head] = value
        else:
            act[rows, bpos] = value
        return act

    return pm.runner.run(base_ids, hooks={site.hook_name: hook})[0]


def test_interchange_logits_match_an_independent_single_hook_patch(tiny_addition_model):
    """The patching engine's interchange_logits equals a hand-written one-hook patch, and the patch does something."""
    from circuitkit.patching.node import interchange_logits

    pm = tiny_addition_model
    rng = random.Random(0)
    base, src = pm.task.encode(pm.task.generate(rng, 16)), pm.task.encode(pm.task.generate(rng, 16))
    for s in ("a0.1@=", "m1@A1", "x1.pre@S2"):
        a = interchange_logits(pm, base, src, parse_site(s))
        b = _reference_interchange_logits(pm, base, src, parse_site(s))
        assert torch.allclose(a, b, atol=1e-5), s
        assert not torch.allclose(a, pm.runner.logits(base), atol=1e-4), s  # the patch did something


def test_redundant_heads_verify_only_as_a_group():
    """Three heads copy x2 equally: no head alone moves the answer, so none verifies alone at the answer level
    (each does at the logit level: it pushes the answer towards the source's x2); patched together they verify
    on the answer (the group grows from two: two of three already outvote the third), and the group is
    confirmed on held-out inputs; the null controls verify nothing."""
    task = CopyTask()
    pm = copy_model(task, n_heads=3)
    ids = task.encode(task.split("test"))
    assert torch.equal(pm.runner.logits(ids)[:, 5].argmax(-1), ids[:, 6])
    heads = ["a0.0@=", "a0.1@=", "a0.2@="]
    queries = task.generate(random.Random(123), 40)
    rep = generate_hypotheses(pm, [parse_site(s) for s in heads + ["a0.0@3", "x0.post@="]], queries,
                              PoolPreimage(pm, pool_size=3000, seed=0), seed=0)
    assert {(s, "tok@2") for s in heads + ["x0.post@="]} <= {(h.site, h.feature) for h in rep.accepted()}
    vr = verify_hypotheses(InterchangeVerifier(pm, n_inputs=2000, seed=0), rep.hypotheses)
    alone = [v for v in vr.verdicts if v.features == ("tok@2",) and v.site in heads]
    assert len(alone) == 3 and not any(v.necessary_targets for v in alone)
    assert all(v.level == "logit" and v.targets[0].graded_iia.ci_low > 0.9 for v in alone)
    groups = [v for v in vr.verdicts if " & " in v.site and v.features == ("tok@2",)]
    assert groups[0].site.count(" & ") == 1 and set(groups[0].site.split(" & ")) < set(heads) and groups[0].verified
    assert [v.split for v in groups] == ["search", "confirm"] and groups[1].verified
    assert all("x0.post@=" not in v.site for v in groups)  # the residual stream is never a group member
    assert any(n.site == "x0.post@=" and not n.group for n in vr.nodes)  # it holds everything: verified alone
    nodes = [n for n in vr.nodes if "tok@2" in n.features and n.site in heads and n.group]
    assert len(nodes) == 2 and all(len(n.group) == 2 and n.site in n.group for n in nodes)
    assert nodes[0].group == nodes[1].group and set(nodes[0].group) < set(heads)
    assert all(n.targets == ("copy",) and n.iia > 0.9 and n.level == "answer" for n in nodes)
    third = [n for n in vr.nodes if n.site in set(heads) - set(nodes[0].group) and "tok@2" in n.features]
    assert len(third) == 1 and third[0].level == "logit" and not third[0].group  # alone, at the logit level
    assert not vr.controls_verified
    ctrl_groups = [v for v in vr.controls if " & " in v.site]
    assert len(ctrl_groups) == 2 * len(groups)  # both null controls beside every group test
