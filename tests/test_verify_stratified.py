"""Stratified interchange: fair sources, what a feature predicts (answer models), IIA as the main
criterion, and the controls that can fail (varied random model, architectural split, proxies)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitkit.hypotheses.preimage_sources import PoolPreimage
from circuitkit.hypotheses.scoring import generate_hypotheses
from circuitkit.models.checkpoint import load_probed
from circuitkit.sites import parse_site
from circuitkit.tasks import get_task
from circuitkit.verification.answers import fit_answer_model, purity
from circuitkit.verification.controls import proxy_features, varied_random_model
from circuitkit.verification.interchange import InterchangeVerifier
from circuitkit.verification.report import claim_hypothesis, verify_hypotheses
from tests.groundtruth_copy import CopyTask, EchoTask, copy_model, echo_model

MODELS = Path(__file__).resolve().parents[1] / "case_studies" / "models"


# ---- answer models ------------------------------------------------------------------------------------
def test_answer_model_finds_the_context_that_makes_a_feature_predict():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 10, 3000) for _ in range(3))
    answer = (a + b) % 10
    am = fit_answer_model("y", a[None], ["a"], np.stack([c, b]), ["c", "b"], answer)
    assert am is not None and am.context == ("b",) and am.purity == 1.0 and am.context_purity < 0.2
    assert am.predict([3], [4]) == 7
    # c never matters: no context makes it predict
    assert fit_answer_model("y", c[None], ["c"], np.stack([a, b]), ["a", "b"], answer) is None
    # the answer itself needs no context; and a feature already implied by the context is irrelevant
    assert fit_answer_model("y", answer[None], ["ans"], np.stack([a]), ["a"], answer).context == ()
    assert fit_answer_model("y", a[None], ["a"], np.stack([answer]), ["ans"], answer) is None
    assert purity(np.stack([a, b]), answer) == 1.0 and purity(a[None], answer) < 0.2


# ---- fair sources ---------------------------------------------------------------------------------------
def test_fair_sources_hold_what_the_feature_needs():
    rng = random.Random(0)
    counting = get_task("counting")
    base = "Bvvzccvczvvvzvcvc|v:8E"
    assert counting.holds_fixed(["count(query)"]) == ("layout", "query")
    assert counting.holds_fixed(["n_letters"]) == ()  # the length is the feature itself
    srcs = counting.fair_sources(base, rng, 30, counting.holds_fixed(["count(query)"]))
    assert len(srcs) == 30 and base not in srcs
    feats = counting.features()
    for s in srcs:
        toks = counting.tokens(s)
        assert counting.layout(toks) == counting.layout(counting.tokens(base)) and feats["query"](toks) == "v"
    assert len({feats["count(query)"](counting.tokens(s)) for s in srcs}) > 3  # the count itself varies

    ioi = get_task("ioi")
    base = ioi.generate(rng, 1)[0]
    hold = ioi.holds_fixed(["IO"])
    assert hold == ("layout", "names")
    srcs = ioi.fair_sources(base, rng, 40, hold)
    f = ioi.features()
    key = (ioi.layout(ioi.tokens(base)), f["names"](ioi.tokens(base)))
    assert all((ioi.layout(ioi.tokens(s)), f["names"](ioi.tokens(s))) == key for s in srcs)
    ios = {f["IO"](ioi.tokens(s)) for s in srcs}
    assert ios == set(f["names"](ioi.tokens(base)).split("+"))  # IO/S swapped among the base's own names

    addition = get_task("addition")
    base = "B615+861=1476E"
    srcs = addition.fair_sources(base, rng, 20)
    assert len(srcs) == 20 and all(len(s) == len(base) for s in srcs)  # same layout: a 4-digit answer
    # several column sums at once (constructive: plain rejection finds about one in 400 draws)
    hold = ("layout", "F1+S1", "F2+S2", "carry(3)")
    srcs = addition.fair_sources(base, rng, 20, hold)
    assert len(srcs) == 20 and base not in srcs
    assert {addition.stratum_key(s, hold) for s in srcs} == {addition.stratum_key(base, hold)}
    assert len({s[1:4] for s in srcs}) > 10  # the digits themselves vary
    held_digit = addition.fair_sources(base, rng, 10, ("layout", "S2", "F2+S2"))
    assert all(s[6] == "6" and s[2] == "1" for s in held_digit)  # S2 held and the sum held: F2 follows


def test_addition_sources_share_the_answer_digits_written_at_the_site():
    """At A_k the model has been given A1..A_k: a fair source writes the same prefix (a different one
    would give operands implying one carry and a written digit stating another); elsewhere, and for
    the written digit itself when it is under test, only the layout is held."""
    addition = get_task("addition")
    assert addition.holds_fixed(["F2+S2", "carry(3)"], "=") == ("layout",)
    assert addition.holds_fixed(["F2+S2", "carry(3)"], "A1") == ("layout", "A1")
    assert addition.holds_fixed(["F3+S3"], "A3") == ("layout", "A1", "A2", "A3")
    assert addition.holds_fixed(["A1"], "A1") == ("layout",)
    assert addition.holds_fixed(["F2"], 10) == ("layout", "A1", "A2")  # index 10 is A2
    rng = random.Random(1)
    feats = addition.features()
    for base in ("B615+861=1476E", "B123+456=579E", "B455+472=927E"):
        key = lambda s: [feats[f](addition.tokens(s)) for f in ("A1", "A2")] + [len(s)]  # noqa: E731
        srcs = addition.fair_sources(base, rng, 30, addition.holds_fixed(["F2+S2"], "A2"))
        assert len(srcs) == 30 and all(key(s) == key(base) for s in srcs)
        assert len({feats["F2+S2"](addition.tokens(s)) for s in srcs}) > 3  # the feature under test varies


# ---- the verifier on ground truth ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def copy_pm():
    torch.set_num_threads(1)
    return copy_model(CopyTask())


def test_iia_is_required_and_measured_against_the_feature(copy_pm):
    ver = InterchangeVerifier(copy_pm, n_inputs=1500)
    v = ver.test("a0.0@=", ["tok@2"])
    r = v.targets[0]
    assert v.verified and r.iia.ci_low > 0.95 and r.answer_model["context"] == [] and r.iia_coverage == 1.0
    assert r.iia.ci_high == 1.0 and r.iia.ci_low < 1.0  # a score interval: 200 hits of 200 is not [1, 1]
    assert v.hold == ("layout",)
    decoy = ver.test("a0.0@3", ["tok@2"])  # carries the token, never reaches the answer
    assert not decoy.verified and decoy.targets[0].iia.mean < 0.3
    unpredictive = ver.test("x0.pre@1", ["tok@1"])  # moves nothing and predicts no answer
    assert not unpredictive.verified and not any(t.relevant for t in unpredictive.targets)
    assert "predicts no answer" in unpredictive.note
    shuffled = ver.test("a0.0@=", ["tok@2"], condition="shuffled_feature", shuffle=True)
    assert not shuffled.verified and shuffled.targets[0].iia.mean < 0.3
    confirm = ver.test("a0.0@=", ["tok@2"], split="confirm")  # held-out bases
    assert confirm.verified and set(ver.split_rows["search"]).isdisjoint(ver.split_rows["confirm"])


def test_random_model_control_has_varied_predictions(copy_pm):
    ver = InterchangeVerifier(copy_pm, n_inputs=600)
    null, info = varied_random_model(ver, seed=0)
    assert info.top_share <= 0.5 and info.distinct_predictions >= 3
    assert info.init_std > 0.02  # GPT-2's scale predicts "=" at "=" for every input; scaled until it varies
    pred = null.runner.logits(ver.ids[:200]).argmax(-1)[:, 5]
    assert len(set(pred.tolist())) >= 3


def test_architectural_claims_are_set_apart_from_learned_ones(copy_pm):
    """The copy head is learned (the random model cannot copy); an embedding echoing its own token
    through tied unembeddings is true in any GPT-2, trained or not: architectural."""
    def run(pm, task, sites):
        rep = generate_hypotheses(pm, [parse_site(s) for s in sites], task.generate(random.Random(1), 30),
                                  PoolPreimage(pm, pool_size=2000, seed=0), seed=0)
        return verify_hypotheses(InterchangeVerifier(pm, n_inputs=1500), rep.hypotheses)

    copy = run(copy_pm, CopyTask(), ["a0.0@=", "x0.pre@2"])
    assert {(n.site, n.features) for n in copy.learned_nodes} == {("a0.0@=", ("tok@2",)), ("x0.pre@2", ("tok@2",))}
    assert not copy.architectural_nodes and not copy.controls_verified
    echo_task = EchoTask()
    echo = run(echo_model(echo_task), echo_task, ["x0.pre@4", "x0.pre@1"])
    assert [(n.site, n.features) for n in echo.architectural_nodes] == [("x0.pre@4", ("tok@4",))]
    assert not echo.learned_nodes
    assert echo.controls_summary()["random_model"]["verified"] == 1  # that one, on the untrained model
    assert echo.settings["random_model"]["init_std"] == 0.02  # already varied at GPT-2's own scale


def test_proxy_control_runs_beside_verified_nodes(copy_pm):
    ver = InterchangeVerifier(copy_pm, n_inputs=1500)
    assert proxy_features(ver, "a0.0@=", "tok@2") == ["n_distinct"]  # declared by the task
    rep = verify_hypotheses(ver, [_hyp("a0.0@=", "tok@2")])
    proxies = [v for v in rep.controls if v.condition == "proxy"]
    assert [v.features for v in proxies] == [("n_distinct",)] and not proxies[0].verified
    assert rep.controls_summary()["proxy"] == {"tested": 1, "verified": 0, "must_verify_nothing": True}


class _AliasCopyTask(CopyTask):
    """CopyTask with a second name for x2 declared as a proxy of ``tok@2``: a proxy the site truly carries."""

    def task_features(self):
        from circuitkit.tasks.base import Feature

        return super().task_features() + [Feature("x2_alias", lambda t: t[2], "x2 under another name")]

    def proxies(self, feature: str) -> tuple[str, ...]:
        return ("x2_alias", "n_distinct") if feature == "tok@2" else ()


def test_proxy_control_is_skipped_where_the_site_carries_the_proxy_itself():
    pm = copy_model(_AliasCopyTask())
    rep = verify_hypotheses(InterchangeVerifier(pm, n_inputs=1500),
                            [_hyp("a0.0@=", "tok@2"), _hyp("a0.0@=", "x2_alias")])
    assert {n.features for n in rep.learned_nodes} == {("tok@2",), ("x2_alias",)}
    proxies = [v for v in rep.controls if v.condition == "proxy"]
    # the alias verified as a node of its own: its "control" would repeat that test, so only n_distinct runs
    assert [v.features for v in proxies] == [("n_distinct",)] and not proxies[0].verified
    assert rep.settings["proxy_controls_skipped"] == [["a0.0@=", "tok@2", "x2_alias"]]


def test_a_logit_level_node_leaves_its_position_open_for_a_joint_group():
    from circuitkit.verification.report import VerifiedNode, explained_at

    def node(site, feature, level):
        return VerifiedNode(site, (feature,), ("A2",), 0.1, 0.9, False, level=level)

    # addition, A1: a0.2 carries carry(3) only at the logit level; the heads may still carry it jointly
    assert explained_at([node("a0.2@A1", "carry(3)", "logit"), node("x1.mid@A1", "A2", "answer")]) == set()
    assert explained_at([node("a0.2@A1", "carry(3)", "answer")]) == {("A1", "carry(3)")}


def _hyp(site: str, feature: str):
    from circuitkit.hypotheses.records import Hypothesis

    return Hypothesis(site, feature, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0, 0, 0, True)


# ---- the committed models: the paper's mechanisms --------------------------------------------------------
@pytest.mark.parametrize("model", ["counting", "counting_seed4"])
def test_committed_counting_model_count_nodes_and_proxy(model):
    """count(query) at a0.0@Q (where the count is formed) and at a1.0@: (where it is moved) both verify
    with IIA >= 0.9 on fair sources; n_letters, correlated with the count, is rejected.  The same holds on a
    second model trained with another seed and batch size: the finding survives retraining."""
    pm = load_probed(MODELS / model)
    ver = InterchangeVerifier(pm, n_inputs=1500, n_pairs=150)
    for site in ("a0.0@Q", "a1.0@:"):
        v = ver.test(site, ["count(query)"])
        assert v.verified and v.hold == ("layout", "query"), site
        assert v.targets[0].iia.mean >= 0.9, site
    assert proxy_features(ver, "a1.0@:", "count(query)") == ["n_letters"]
    proxy = ver.test("a1.0@:", ["n_letters"], condition="proxy")
    assert not proxy.verified and proxy.hold == ()
    assert not ver.test("m0@Q", ["count(query)"]).verified  # m0 at Q helps, but does not carry the count alone


def test_committed_ioi_name_movers_carry_io_under_swaps():
    """Sources swap IO and S (or flip S2) among the base's own names: the layer-1 heads at END, patched
    together, move the answer to the source's IO."""
    pm = load_probed(MODELS / "ioi")
    ver = InterchangeVerifier(pm, n_inputs=1500, n_pairs=150)
    v = ver.test("a1.0@END & a1.1@END & a1.2@END & a1.3@END", ["IO"])
    assert v.hold == ("layout", "names")
    assert v.targets[0].iia.mean >= 0.9 and v.verified


def test_a_weak_component_joins_the_carrier_beside_it_only_when_it_adds_to_it():
    """IOI's a0.0@IO moves the IO logit the way S predicts, too weakly to verify alone; patched with a0.1@IO, which
    carries S alone, it adds to the S-aligned shift on the same pairs (paired CI above 0, search and held-out
    halves), so it becomes a node of that group.  A layer-1 head at IO, which cannot reach the answer at END,
    makes the group verify just as well (a0.1@IO carries it) but adds exactly nothing: it is not labelled."""
    pm = load_probed(MODELS / "ioi")
    ver = InterchangeVerifier(pm, n_inputs=3000, n_pairs=200, seed=0)
    # as in the ioi case study: the group search stops at the strongest pair (a0.2@IO, m0@IO) before a0.0@IO
    claims = [(s, "S") for s in ("a0.2@IO", "m0@IO", "a0.1@IO", "a0.0@IO", "a1.0@IO")]
    rep = verify_hypotheses(ver, [], controls=False, claims=claims)
    alone = {v.site: v for v in rep.verdicts if v.features == ("S",) and " & " not in v.site}
    assert alone["a0.1@IO"].verified and not alone["a0.0@IO"].verified and not alone["a1.0@IO"].verified
    joined = [n for n in rep.nodes if n.site == "a0.0@IO"]
    assert any(n.group == ("a0.2@IO", "m0@IO") for n in rep.nodes)
    assert len(joined) == 1 and joined[0].group == ("a0.1@IO", "a0.0@IO") and joined[0].confirmed
    assert joined[0].level == "logit" and joined[0].iia_ci[0] >= 0.8
    assert not any(n.site == "a1.0@IO" for n in rep.nodes)
    tried = {t[0]: t for t in rep.settings["joins_tried"]}
    assert tried["a0.0@IO"][4][1] > 0 and tried["a0.0@IO"][5][1] > 0
    # its group verified on the search half: only the added shift turned it down, before the held-out half
    assert [(v.split, v.verified) for v in rep.verdicts if v.site == "a0.1@IO & a1.0@IO"] == [("search", True)]
    assert tried["a1.0@IO"][4] == [0.0, 0.0] and tried["a1.0@IO"][5] is None
    with pytest.raises(Exception, match="must be one of the sites"):
        ver.added_shift("a0.1@IO & a0.0@IO", "a0.2@IO", ["S"])


def test_committed_addition_heads_at_a1_carry_the_column_sums_jointly():
    """The paper's second addition claim: A2 is computed at A1 from F2+S2 and the carry.  No single head
    carries it; the components at A1 carry F1+S1 (for 4-digit answers), F2+S2 and carry(3) only together.
    The joint group search finds that, agreeing sources for the joint are drawn from their own stratum, and
    the held-out confirmation holds."""
    pm = load_probed(MODELS / "addition")
    ver = InterchangeVerifier(pm, n_inputs=1500, n_pairs=60)
    heads = [f"a{layer}.{h}@A1" for layer in (0, 1) for h in range(4)]
    alone = ver.test(heads[5], ["F2+S2"])
    assert not alone.verified
    joint = ver.test(" & ".join(heads), ["F1+S1", "F2+S2", "carry(3)"])
    a2 = next(r for r in joint.targets if r.target == "A2")
    assert a2.n_agree >= 30 and a2.iia.ci_low >= 0.8 and joint.verified
    claims = [(s, f) for s in heads for f in ("F2+S2", "carry(3)")]
    suggested = [claim_hypothesis(s, "F1+S1") for s in heads[4:7]]  # as the preimages at A1 suggest
    rep = verify_hypotheses(ver, suggested, controls=False, claims=claims)
    grouped = [n for n in rep.nodes if n.group and n.joint and "F2+S2" in n.features]
    assert grouped and all(n.confirmed for n in grouped)
    assert {n.site for n in grouped} & set(heads) and grouped[0].iia >= 0.9


def test_a_component_verified_alone_leaves_the_others_to_a_group_search():
    """Site groups are searched among the components where a feature is accepted but not verified alone: an
    MLP that carries IO by itself is left out of the IO group at END, and the heads still form one."""
    from circuitkit.verification.report import _group_candidates, claim_hypothesis

    hyps = [claim_hypothesis(s, "IO") for s in ("a1.2@END", "m1@END", "a1.3@END", "x1.post@END")]
    hyps.append(claim_hypothesis("a1.0@END", "S"))
    got = _group_candidates(hyps, {("m1@END", "IO")}, 12)
    assert {k: sorted(v) for k, v in got.items()} == {("END", "IO"): ["a1.2@END", "a1.3@END"]}
    # one component left besides the verified one: no group
    assert _group_candidates(hyps[:2], {("m1@END", "IO")}, 12) == {}
    got = _group_candidates(hyps, set(), 12)
    assert {k: sorted(v) for k, v in got.items()} == {("END", "IO"): ["a1.2@END", "a1.3@END", "m1@END"]}


def test_group_confirmation_falls_back_to_the_unpruned_group_at_a_bonferroni_level():
    """The held-out half confirms the pruned group first, else the group before pruning; with two candidates
    each is judged at family 2, with one (pruning removed nothing) at family 1; a miss on both is None."""
    from circuitkit.verification.report import _confirm_first

    calls: list[tuple[tuple[str, ...], str, int]] = []

    def run(confirming: set[tuple[str, ...]]):
        def fn(sites, split="search", family=1):
            calls.append((tuple(sites), split, family))
            v = type("V", (), {"verified": tuple(sites) in confirming})()
            return v, None
        return fn

    pruned, grown = ["a", "b"], ["a", "b", "c"]
    got = _confirm_first(run({("a", "b", "c")}), [pruned, grown])
    assert got is not None and got[0] == grown
    assert calls == [(("a", "b"), "confirm", 2), (("a", "b", "c"), "confirm", 2)]
    calls.clear()
    assert _confirm_first(run({("a", "b")}), [pruned, grown])[0] == pruned and len(calls) == 1
    calls.clear()
    assert _confirm_first(run(set()), [grown, grown]) is None and calls == [(("a", "b", "c"), "confirm", 1)]


def test_a_family_of_tests_widens_the_intervals(copy_pm):
    """family=2 halves the error rate per test (Bonferroni), so the same pairs give a wider IIA interval;
    family < 1 is refused."""
    ver = InterchangeVerifier(copy_pm, n_inputs=600, n_pairs=60)
    one, two = ver.test("a0.0@=", ["tok@2"]), ver.test("a0.0@=", ["tok@2"], family=2)
    assert two.confidence > one.confidence
    r1, r2 = one.targets[0], two.targets[0]
    assert r1.iia.n == r2.iia.n and r2.iia.ci_low < r1.iia.ci_low
    with pytest.raises(Exception, match="family must be a positive"):
        ver.test("a0.0@=", ["tok@2"], family=0)


def test_directional_share_counts_movement_and_keeps_an_interval_when_every_pair_agrees():
    """The logit level's graded IIA: the upward share of the total movement (a big upward shift outweighs small
    downward ones), a bootstrap interval, and Wilson's where every shift goes one way (30 of 30 is not [1, 1])."""
    import numpy as np

    from circuitkit.stats import directional_share

    mixed = directional_share(np.array([3.0, -1.0] * 20))
    assert mixed.mean == 0.75 and mixed.ci_low < 0.75 < mixed.ci_high
    up = directional_share(np.full(30, 0.2))
    assert up.mean == 1.0 and 0.85 < up.ci_low < 0.9 and up.ci_high > 0.999
    assert directional_share(np.zeros(40)).mean == 0.0  # nothing moves: nothing is carried
