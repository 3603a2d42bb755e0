"""Closing the loop (labels issue, part 2) and the built-in causal models, on the committed IOI model.

The IOI model decides its answer at S2: m0@S2 carries S (the repeated name), which only the causal model's token
edit can predict (with the template and names held fixed, the data-driven g has one input per group).  Starting
from the name movers alone, growth must add m0@S2, and the loop must then give it a verified label."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from circuitkit.circuit.close_loop import close_the_loop
from circuitkit.circuit.discover import pool_hypothesize
from circuitkit.circuit.evaluate import AblationEvaluator
from circuitkit.circuit.grow import named_components
from circuitkit.hypotheses.records import HypothesisReport, Thresholds
from circuitkit.models.checkpoint import load_probed
from circuitkit.tasks.registry import load_task
from circuitkit.verification.interchange import InterchangeVerifier
from circuitkit.verification.report import claim_hypothesis, verify_hypotheses

IOI_MODEL = Path(__file__).resolve().parents[1] / "case_studies" / "models" / "ioi"


@pytest.mark.parametrize("name", ["counting", "addition", "ioi"])
def test_built_in_answers_agree_with_the_written_answers(name: str) -> None:
    task = load_task(name)
    for text in task.generate(random.Random(1), 200):
        toks = task.tokens(text)
        assert task.answers(toks) == {t.name: t.token for t in task.targets(toks)}


def test_ioi_answers_an_edited_prompt_and_refuses_an_abc_one() -> None:
    task = load_task("ioi")
    toks = task.tokens("<bos> When Sam and Rose went to the school, Sam gave a letter to Rose <eos>")
    s2 = task.resolve_position("S2", toks)
    swapped = list(toks)
    swapped[s2] = "Rose"  # S := Rose: the answer becomes Sam
    assert task.answers(swapped) == {"IO": task.vocab.id_of("Sam")}
    swapped[s2] = "Kate"  # an ABC prompt: no answer
    assert task.answers(swapped) is None


def test_growth_nodes_are_re_examined_and_m0_at_s2_gains_its_label() -> None:
    pm = load_probed(IOI_MODEL)
    ver = InterchangeVerifier(pm, n_inputs=1200, n_pairs=60, seed=0)
    vr = verify_hypotheses(ver, [claim_hypothesis("a1.2@END", "IO"), claim_hypothesis("a1.3@END", "IO")],
                           controls=False)
    ev = AblationEvaluator(pm, n=200, seed=0)
    cands = named_components(ev, ["S2", "END"])
    none = close_the_loop(ev, ver, vr, cands, 0.9, hypothesize=None)
    assert "m0@S2" in none.growth.added and not none.rounds  # growth alone leaves it unlabelled
    loop = close_the_loop(ev, ver, vr, cands, 0.9, pool_hypothesize(pm, pool=2000, n_queries=20), max_rounds=1)
    assert loop.rounds and "m0@S2" in loop.rounds[0].examined
    node = next(n for n in loop.verification.nodes if n.site == "m0@S2")
    assert "S" in node.features and node.iia is not None and node.iia >= 0.95
    assert "m0@S2" not in loop.growth.added
    # the newly labelled node is in growth's start, so the verified nodes alone now reproduce much more
    assert loop.rounds[0].verified_faithfulness["all"] > none.growth.steps[0]["faithfulness"]["all"] + 0.15


def test_heads_beside_a_verified_carrier_inherit_its_feature_as_a_group() -> None:
    """The layer-0 heads at IO each move the IO logit too little to verify alone, and the preimages of so small a
    component need not name the IO name; beside m0@IO, which carries it (the token at IO), they are tested for it
    (an inherited claim) and verify together, with the null controls beside them verifying nothing."""
    pm = load_probed(IOI_MODEL)
    ver = InterchangeVerifier(pm, n_inputs=1200, n_pairs=200, seed=0)  # graded IIA needs the default pairs
    start = [claim_hypothesis("a1.2@END", "IO"), claim_hypothesis("a1.3@END", "IO"),
             claim_hypothesis("m0@IO", "tok@p")]  # the token at IO, the IO name: the causal model's token edit
    vr = verify_hypotheses(ver, start, controls=False)
    assert "m0@IO" in {n.site for n in vr.nodes}
    ev = AblationEvaluator(pm, n=200, seed=0)
    cands = [s for s in named_components(ev, ["IO", "END"]) if str(s).startswith("a0.")]
    heads = [f"a0.{h}@IO" for h in range(pm.n_heads)]

    def no_preimages(sites: object) -> HypothesisReport:  # only an inherited claim can label a head
        return HypothesisReport("ioi", "", "none", 0.0, Thresholds(), [])

    # the first pass already hypothesized the heads (nothing accepted): no new preimages, the claims still apply
    first = HypothesisReport("ioi", "", "none", 0.0, Thresholds(),
                             [replace(claim_hypothesis(h, "tok@1"), accepted=False) for h in heads])
    loop = close_the_loop(ev, ver, vr, cands, 0.99, no_preimages, first, max_rounds=1)
    rnd = loop.rounds[0]
    examined = [s for s in rnd.examined if s in heads]
    assert examined and {(s, "tok@p") for s in examined} <= set(rnd.inherited_claims)
    labelled = [n for n in loop.verification.nodes if n.site in heads]
    assert labelled and all(len(n.group) >= 2 for n in labelled)
    # the token at IO (inherited beside m0@IO); IO and S, the circuit's variables elsewhere, are tested too
    assert "tok@p" in {f for n in labelled for f in n.features}
    assert {f for n in labelled for f in n.features} <= {"tok@p", "IO", "S"}
    assert not [v for v in loop.verification.controls_verified if v.condition == "shuffled_feature"]


def test_a_grown_node_is_tested_for_the_features_the_rest_of_the_circuit_carries() -> None:
    """No verified node sits at IO, so nothing there can be inherited from a neighbour; the heads growth adds at
    IO are still tested for S and IO, the features the circuit carries at S2 and END, and a group of them verifies
    (the circuit's own variables are the first hypotheses for a node it needs), controls verifying nothing."""
    pm = load_probed(IOI_MODEL)
    ver = InterchangeVerifier(pm, n_inputs=1200, n_pairs=200, seed=0)
    start = [claim_hypothesis("a1.2@END", "IO"), claim_hypothesis("a1.3@END", "IO"), claim_hypothesis("m0@S2", "S")]
    vr = verify_hypotheses(ver, start, controls=False)
    assert not [n for n in vr.nodes if n.site.endswith("@IO")]
    ev = AblationEvaluator(pm, n=200, seed=0)

    def no_preimages(sites: object) -> HypothesisReport:  # only an inherited claim can label a node
        return HypothesisReport("ioi", "", "none", 0.0, Thresholds(), [])

    loop = close_the_loop(ev, ver, vr, named_components(ev, ["IO"]), 0.99, no_preimages, max_rounds=1)
    rnd = loop.rounds[0]
    assert rnd.examined and {(s, f) for s in rnd.examined for f in ("S", "IO")} <= set(rnd.inherited_claims)
    labelled = [n for n in loop.verification.nodes if n.site.endswith("@IO")]
    assert labelled and {n.site for n in labelled} == set(rnd.verified)
    assert all(set(n.features) <= {"S", "IO"} and len(n.group) >= 2 for n in labelled)
    assert not loop.verification.controls_verified
