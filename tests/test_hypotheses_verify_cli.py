"""hypothesize -> verify -> circuit through the CLI on a (briefly trained) addition model, plus
feature and statistics units and user errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from circuitkit.cli import main
from circuitkit.hypotheses.features import all_features, reads_beyond
from circuitkit.hypotheses.scoring import FeatureEncoder, alias_groups
from circuitkit.stats import diff_estimate
from circuitkit.tasks import get_task


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generic_and_positional_features():
    task = get_task("addition")
    feats = all_features(task)
    toks = task.tokens("B615+861=1476E")
    assert feats["tok@3"](toks) == "5" and feats["F3"](toks) == 5
    assert feats["tok@p-1"](toks, 9) == "=" and feats["tok@p"](toks, 9) == "1"
    assert feats["count(tok@p)"](toks, 6) == 2  # the second "6" by position 6 ...
    assert feats["count(6)"](toks, 8) == 2 and feats["count(6)"](toks, 13) == 3  # ... counts stop at p
    assert feats["length"](toks, 8) == 8 and feats["length"](toks, 13) == 12  # BOS/EOS are not counted
    assert feats["eq@1,6"](toks) is True and feats["eq@1,2"](toks) is False
    assert feats["carry(1)"](toks) == 1 and feats["carry(2)"](toks) == 0 and feats["carry(3)"](toks) == 0
    assert feats["tok@p-3"](toks, 1) is None  # before the start: undefined, not wrapped around
    assert reads_beyond("tok@9", 8) and not reads_beyond("tok@8", 8) and reads_beyond("eq@2,10", 8)
    assert not reads_beyond("F1", 0)  # task features are not filtered by name


def test_alias_groups_prefer_task_features():
    task = get_task("addition")
    feats = {k: v for k, v in all_features(task).items() if k in ("F1", "tok@1", "S2", "tok@0", "carry(1)")}
    enc = FeatureEncoder(task, feats)
    texts = task.generate(random.Random(0), 300)
    codes = enc.codes([(t, 8) for t in texts])
    groups = alias_groups(codes, enc.names, [f.name for f in task.task_features()])
    assert groups["F1"] == ["tok@1"]  # same partition, the task's name wins
    assert "tok@0" not in groups and "tok@0" not in sum(groups.values(), [])  # constant "B": dropped
    assert set(groups) == {"F1", "S2", "carry(1)"}


def test_diff_estimate_ci_covers_truth():
    rng = np.random.default_rng(0)
    x, y = rng.binomial(1, 0.7, 400), rng.binomial(1, 0.4, 400)
    e = diff_estimate(x, y)
    assert e.ci_low < 0.3 < e.ci_high and e.ci_high - e.ci_low < 0.2
    z = diff_estimate(np.ones(50), np.ones(50))
    assert z.mean == z.ci_low == z.ci_high == 0.0


def test_cli_chain_on_addition(tiny_addition_model, tmp_path, capsys):
    model = str(tiny_addition_model.path)
    hyp, ver, circ = tmp_path / "hyp.json", tmp_path / "ver.json", tmp_path / "circuit"
    rc, out, err = _run(capsys, ["hypothesize", model, "--sites", "a0.0,a0.1,m0", "--positions", "=,A1",
                                 "--queries", "20", "--pool", "1500", "--out", str(hyp), "--json"])
    assert rc == 0, err
    d = json.loads(out)
    assert d["thresholds"]["fdr"] == 0.05 and "Benjamini" in d["settings"]["fdr_method"]
    assert d["n_tested"] > 50 and len(d["hypotheses"]) >= 6
    assert {h["site"] for h in d["hypotheses"]} == {"a0.0@=", "a0.0@A1", "a0.1@=", "a0.1@A1", "m0@=", "m0@A1"}
    for h in d["hypotheses"]:
        assert 0 <= h["q_value"] <= 1 and h["p_value"] <= h["q_value"] + 1e-12
        assert h["kappa"] == pytest.approx((h["agreement"] - h["baseline"]) / (1 - h["baseline"]), abs=2e-3)
        assert h["accepted"] == (h["q_value"] <= 0.05 and h["kappa"] >= 0.4 and h["lift"] >= 1.25
                                 and h["n_queries"] >= 5)
    rc, out, err = _run(capsys, ["verify", model, "--hypotheses", str(hyp), "--inputs", "800", "--pairs", "60",
                                 "--out", str(ver), "--json"])
    assert rc == 0, err
    v = json.loads(out)
    n_acc = sum(h["accepted"] for h in d["hypotheses"])
    singles = [x for x in v["verdicts"] if len(x["features"]) == 1 and " & " not in x["site"]]
    assert len(singles) == n_acc
    accepted = {(h["site"], h["feature"]) for h in d["hypotheses"] if h["accepted"]}
    for g in (x for x in v["verdicts"] if " & " in x["site"]):  # site groups: a feature accepted at each member
        assert all((s, g["features"][0]) in accepted for s in g["site"].split(" & "))
    assert v["controls_summary"]["random_model"]["verified"] == 0
    assert v["controls_summary"]["shuffled_feature"]["verified"] == 0
    assert v["controls_summary"]["proxy"]["verified"] == 0
    assert "thresholds_text" in v and v["thresholds"]["min_effect"] == 0.1 and v["thresholds"]["min_iia"] == 0.8
    rc, out, err = _run(capsys, ["circuit", model, "--verified", str(ver), "--out", str(circ), "--inputs", "600",
                                 "--eval-inputs", "200", "--no-picture", "--json"])
    assert rc == 0, err
    c = json.loads(out)
    assert {"json", "graphml", "dot"} <= set(c["files"])
    sites = {n["id"]: n for n in c["nodes"] if n["kind"] == "site"}
    assert {n["site"] for n in v["nodes"]} <= set(sites)  # verified nodes, then what growth added
    added = set(sites) - {n["site"] for n in v["nodes"]}
    assert added == set(c["growth"]["added"]) and all(sites[a]["features"] == ["unexplained"] for a in added)
    assert c["evaluation"]["faithfulness_normalized"]["all"] is not None and "definitions" in c["evaluation"]
    assert {"cpr", "cmd", "xs", "ys"} <= set(c["curve"]) and "faithfulness_normalized" in c["edge_evaluation"]


def test_cli_direct_claim_and_errors(tiny_addition_model, tmp_path, capsys):
    model = str(tiny_addition_model.path)
    rc, out, err = _run(capsys, ["verify", model, "--claim", "a0.0@=", "F1", "--inputs", "600", "--pairs", "50",
                                 "--json"])
    assert rc == 0, err
    v = json.loads(out)
    assert v["verdicts"][0]["features"] == ["F1"]
    assert {c["condition"] for c in v["controls"]} <= {"random_model", "shuffled_feature", "proxy"}
    assert sum(c["condition"] != "proxy" for c in v["controls"]) == 2  # both null controls beside the claim
    rc, _, err = _run(capsys, ["verify", model, "--claim", "a0.0@=", "nonsense", "--inputs", "100"])
    assert rc == 2 and "unknown feature" in err
    rc, _, err = _run(capsys, ["hypothesize", model, "--sites", "a0.0", "--queries", "5", "--pool", "100"])
    assert rc == 2 and "has no position" in err
    rc, _, err = _run(capsys, ["hypothesize", model, "--sites", "a7.0@=", "--queries", "5", "--pool", "100"])
    assert rc == 2 and "layer 7 does not exist" in err
    rc, _, err = _run(capsys, ["verify", model, "--hypotheses", str(tmp_path / "missing.json")])
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(capsys, ["circuit", model, "--verified", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    assert rc == 2 and "does not exist" in err
