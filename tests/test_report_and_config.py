"""Report rendering (self-contained HTML, Markdown + figure files) and case-study configs."""
from __future__ import annotations

import json
import re

import pytest

from circuitkit.errors import CircuitkitError
from circuitkit.pipeline.config import available_cases, load_case
from circuitkit.pipeline.outputs import CaseResults
from circuitkit.pipeline.stages import StageRunner
from circuitkit.report.document import Figure, HtmlPanel, Report, Table
from circuitkit.report.figures import heatmap
from circuitkit.report.html import render_html
from circuitkit.report.markdown import render_markdown


def _report() -> Report:
    r = Report("Case <study>", "subtitle with `code`")
    s = r.section("Results")
    s.add("Prose with **bold** and <script>alert(1)</script>.")
    s.add(Table(["site", "value"], [["a1.0@:", 0.123456], ["x|y", 2]], caption="A table"))
    s.add(Figure("heat", heatmap([[1.0, -1.0]], ["r"], ["c1", "c2"], "t"), caption="A heat map"))
    s.add(HtmlPanel("<div class='panel'>panel</div>", "panel as text"))
    return r


def test_html_is_self_contained_and_escaped():
    page = render_html(_report())
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no network references
    assert "<b>bold</b>" in page and "0.1235" in page


def test_markdown_links_figures():
    md, files = render_markdown(_report())
    assert "| x\\|y | 2 |" in md
    assert "![A heat map](figures/heat.png)" in md and files["figures/heat.png"].startswith(b"\x89PNG")
    assert "panel as text" in md


def test_case_configs_load_and_quick_overrides():
    assert {"counting", "addition", "ioi"} <= set(available_cases())
    full, quick = load_case("counting"), load_case("counting", quick=True)
    assert full.decoder.steps == 6500 and quick.decoder.steps == 60  # budgets in steps: same seed, same decoder
    assert full.decoder.eval_per_cell == 256 and quick.decoder.eval_per_cell == 16  # 1,024 samples a query in full
    assert full.decoder.d_model == 96 and quick.decoder.d_model == 128  # quick_d_model overrides the width
    assert quick.hypotheses.pool < full.hypotheses.pool and quick.quick


def test_quick_on_a_short_file_of_ones_own_gets_the_quick_budgets(tmp_path):
    """A budget the file sets in neither form takes its quick default under --quick (not an hour of decoder
    training); one the file sets, plain or quick_, is kept as written."""
    from circuitkit.pipeline.config import QUICK_DEFAULTS, DecoderSection, HypothesisSection

    f = tmp_path / "c.toml"
    f.write_text('name = "c"\ntask = "addition"\n[decoder]\neval_queries = 50\n[hypotheses]\nquick_pairs = 30\n')
    full, quick = load_case(str(f)), load_case(str(f), quick=True)
    assert (full.decoder.minutes, full.decoder.steps) == (DecoderSection().minutes, DecoderSection().steps)
    assert (quick.decoder.minutes, quick.decoder.steps) == (5.0, 60) and QUICK_DEFAULTS[DecoderSection]["steps"] == 60
    assert quick.decoder.eval_queries == 50 and full.decoder.eval_queries == 50  # set plain: kept in both
    assert quick.hypotheses.pairs == 30 and full.hypotheses.pairs == HypothesisSection().pairs
    assert quick.hypotheses.pool == 2000 < full.hypotheses.pool and quick.patching.examples == 60


def test_decoder_keys_reach_the_trainer_and_zero_keeps_its_defaults(tmp_path):
    from circuitkit.inversion.train import DecoderTrainConfig
    from circuitkit.pipeline.run import decoder_train_config

    f = tmp_path / "c.toml"
    f.write_text('name = "c"\ntask = "addition"\nseed = 3\n[decoder]\nsteps = 500\nd_model = 64\nn_slots = 2\n'
                 'rebalance_floor = 0.05\nrebalance_every = 400\nrebalance_queries = 8\nrebalance_per_cell = 256\n'
                 'rebalance_window = 10\n')
    got = decoder_train_config(load_case(str(f)))
    assert (got.steps, got.d_model, got.cond_mid, got.n_slots, got.seed) == (500, 64, 128, 2, 3)
    assert (got.rebalance_floor, got.eval_every, got.eval_queries, got.eval_per_cell, got.eval_window) == (
        0.05, 400, 8, 256, 10)
    f.write_text('name = "c"\ntask = "addition"\n')
    plain, default = decoder_train_config(load_case(str(f))), DecoderTrainConfig()
    assert (plain.eval_every, plain.eval_queries, plain.eval_per_cell, plain.eval_window, plain.d_model) == (
        default.eval_every, default.eval_queries, default.eval_per_cell, default.eval_window, default.d_model)


def test_bad_case_configs(tmp_path):
    with pytest.raises(CircuitkitError, match="available: .*counting"):
        load_case("nonexistent")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ntask = "counting"\n[decoder]\nminuts = 3\n')
    with pytest.raises(CircuitkitError, match="unknown key 'minuts'"):
        load_case(str(bad))
    bad.write_text('name = "x"\ntask = "sorting"\n')
    with pytest.raises(CircuitkitError, match="unknown task 'sorting'"):
        load_case(str(bad))
    bad.write_text('name = "x" task')
    with pytest.raises(CircuitkitError, match="invalid TOML"):
        load_case(str(bad))
    bad.write_text('name = "x"\ntask = "counting"\n[hypotheses]\nn_per_cell = -4\n')
    with pytest.raises(CircuitkitError, match="n_per_cell must be >= 1, or 0"):
        load_case(str(bad))


def test_stage_runner_caches_and_resumes(tmp_path):
    calls = []

    def make(tag):
        def fn(d):
            calls.append(tag)
            (d / "out.txt").write_text(tag)
            return {"tag": tag}
        return fn

    r1 = StageRunner(tmp_path, log=lambda m: None)
    r1.run("a", {"x": 1}, make("a1"))

    def boom(d):
        (d / "partial.txt").write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        r1.run("b", {}, boom, depends=("a",))
    assert not (tmp_path / "b").exists()  # nothing half-written
    r2 = StageRunner(tmp_path, log=lambda m: None)
    assert r2.run("a", {"x": 1}, make("a2")) == {"tag": "a1"}  # cached
    r2.run("b", {}, make("b"), depends=("a",))
    r2.run("a", {"x": 2}, make("a3"))  # config changed: recomputed
    assert calls == ["a1", "b", "a3"] and (tmp_path / "a" / "out.txt").read_text() == "a3"


def test_a_rerendered_report_keeps_the_readers_notes_and_nothing_else_stale(tmp_path):
    """The report directory is replaced whole (no stale figure survives), but a README.md someone wrote
    there about the report is carried over."""
    from circuitkit.pipeline.report import write_report

    out = tmp_path / "report"
    rep = Report("t")
    rep.section("s").add("first")
    write_report(rep, out, {"kind": "test"}, CaseResults(claims={"x": "holds"}))
    (out / "README.md").write_text("notes on this report\n")
    (out / "stale.png").write_bytes(b"old")
    rep2 = Report("t")
    rep2.section("s").add("second")
    write_report(rep2, out, {"kind": "test"}, CaseResults(claims={"x": "does not hold"}))
    assert (out / "README.md").read_text() == "notes on this report\n"
    assert not (out / "stale.png").exists()
    assert "second" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text()) == {"claims": {"x": "does not hold"}}


def test_a_site_group_is_one_row_of_the_verified_table():
    """Members of a site group share one test: one row naming the group (not one row per member with the same
    numbers); a single node keeps its own row and says what made its predictions."""
    from circuitkit.pipeline.report import verified_node_rows

    group = ["a0.0@=", "a1.1@="]
    common = {"features": ["F1+S1"], "targets": ["A1"], "iia": 0.965, "iia_ci": [0.9, 0.99], "effect": 0.375,
              "hold": ["layout"], "confirmed": True, "group": group, "prediction": ["data-driven g(f, D)"]}
    nodes = [{"site": s, **common} for s in group]
    nodes.append({"site": "a1.0@:", "features": ["count(query)"], "targets": ["answer"], "iia": 1.0,
                  "iia_ci": [0.97, 1.0], "effect": 0.9, "hold": [], "confirmed": None, "group": [],
                  "prediction": ["causal model: token edit"]})
    rows = verified_node_rows(nodes)
    assert [r[0] for r in rows] == ["a0.0@= & a1.1@=", "a1.0@:"]
    assert rows[0][3] == "0.965 [0.900, 0.990]" and rows[1][-1] == "causal model: token edit"
    assert rows[0][4] == "answer"  # nodes saved before levels existed were verified on the answer


def test_a_whole_story_claim_is_judged_on_the_verified_nodes_alone(tmp_path):
    """A claim with a list of paths holds only when every value does; an undefined value never holds."""
    from types import SimpleNamespace

    from circuitkit.pipeline.analysis import evaluate_claims

    claim = {"claim": "whole story", "kind": "circuit", "path": ["verified_faithfulness/all", "explained_share"],
             "min": 0.9}

    def judge(circuit: dict) -> str:
        ctx = SimpleNamespace(work=tmp_path, cfg=SimpleNamespace(paper_claims=[claim]), results=CaseResults(circuit=circuit))
        return evaluate_claims(ctx)["whole story"]

    grown = {"evaluation": {"faithfulness_normalized": {"all": 0.95}}}  # the grown circuit is faithful ...
    assert judge({**grown, "verified_faithfulness": {"all": 0.96}, "explained_share": 1.0}).startswith("holds")
    no = judge({**grown, "verified_faithfulness": {"all": 0.14}, "explained_share": 0.15})  # ... its labels are not
    assert no.startswith("does not hold") and "verified_faithfulness/all = 0.140" in no
    assert judge({**grown, "verified_faithfulness": {"all": float("nan")}, "explained_share": 0.95}).startswith(
        "does not hold (verified_faithfulness/all = undefined")
    assert judge(grown).startswith("not evaluated")


def test_a_site_group_is_one_entry_in_a_claims_verdict(tmp_path):
    """Each member of a verified site group is its own verified node; the claim names the group once."""
    from types import SimpleNamespace

    from circuitkit.pipeline.analysis import evaluate_claims

    group = ["a0.0@=", "a1.1@="]
    common = {"features": ["F1+S1"], "iia": 0.965, "effect": 0.375, "group": group, "level": "answer"}
    nodes = [{"site": s, **common} for s in group] + [
        {"site": "a0.2@=", "features": ["F1"], "iia": 0.99, "effect": 0.5, "group": [], "level": "answer"}]
    claim = {"claim": "routing", "kind": "verified", "site": ["a0.0@=", "a0.2@=", "a1.1@="], "feature": ["F1", "F1+S1"]}
    ctx = SimpleNamespace(work=tmp_path, cfg=SimpleNamespace(paper_claims=[claim]),
                          results=CaseResults(circuit={"verified_nodes": nodes}))
    text = evaluate_claims(ctx)["routing"]
    assert text.startswith("holds") and text.count("carries") == 2
    assert "a0.0@= + a1.1@= (site group) carries F1+S1 (IIA 0.965, effect 0.375)" in text
    # a component that joined the group (verification/report.py) is named after it, not as a third entry
    joined = {"site": "a0.3@=", **common, "iia": 1.0, "group": [*group, "a0.3@="]}
    claim["site"].append("a0.3@=")
    ctx.results = CaseResults(circuit={"verified_nodes": [*nodes, joined]})
    text = evaluate_claims(ctx)["routing"]
    assert text.count("carries") == 2 and "(IIA 0.965, effect 0.375), joined by a0.3@= (IIA 1.0)" in text


def test_paper_protocols_are_looked_up_by_task_and_the_comparison_reads_the_runs_own_results():
    """The pipeline names no task: counting's table protocol and IOI's Wang et al. comparison come from
    paper/protocols.py; a task no paper covers gets the generic protocol."""
    import numpy as np

    from circuitkit.paper.protocols import paper_protocol

    assert paper_protocol("counting").group_table is not None and paper_protocol("counting").comparison is None
    assert paper_protocol("first_digit").group_table is None and paper_protocol("first_digit").comparison is None
    wang = paper_protocol("ioi").comparison
    assert wang.shape == (12, 12) and "2 layers × 4 heads" in wang.other_shape.format(layers=2, heads=4)
    mean = np.full((12, 3, 12), 5.0)
    mean[9, 2, 9] = 1.0  # patching a9.9 at END drops the logit difference from 5 to 1
    rows = {r[0]: r for r in wang.rows({"mean": mean.tolist(), "base_mean": 5.0}, {"a9.9", "a7.3"}, 12, 12)}
    assert rows["name mover"][2:] == ["4.000", "9.9"] and rows["S-inhibition"][3] == "7.3"
    assert rows["induction"][2:] == ["0.000", "none"]
    assert wang.rows(None, set(), 12, 12)[0][2] == "n/a"


def test_a_run_records_a_model_inside_the_checkout_relative_to_it(tmp_path):
    """Reports are shared: a model path inside the checkout is recorded and shown relative to its root (a snapshot
    or clone elsewhere gives the same text); a path outside it stays as given."""
    from circuitkit.pipeline.config import REPO_ROOT, repo_relative

    assert repo_relative(REPO_ROOT / "case_studies" / "models" / "ioi") == "case_studies/models/ioi"
    assert repo_relative(str(tmp_path / "m")) == str(tmp_path / "m")


def test_the_zero_ablation_pass_is_reported_with_its_counts_and_kept_tests():
    """``[circuit] structural``: the report says how many nodes and paths were tested and lists the kept ones; a run
    without the pass says nothing about it."""
    from circuitkit.pipeline.report import _structural_text

    tests = [{"sender": "m0@x1", "receiver": None, "constant_change": 0.0, "target": "y1", "effect": 0.42,
              "ci_low": 0.33, "ci_high": 0.52, "n": 100, "kept": True},
             {"sender": "a0.0@x1", "receiver": None, "constant_change": 0.0, "target": "y1", "effect": 0.12,
              "ci_low": 0.07, "ci_high": 0.2, "n": 100, "kept": False},
             {"sender": "m0@x1", "receiver": "m1@x1", "constant_change": 0.0, "target": "y1", "effect": 0.42,
              "ci_low": 0.33, "ci_high": 0.52, "n": 100, "kept": True},
             {"sender": "x0.pre@x1", "receiver": "a1.0@x1", "constant_change": 0.0, "target": "y1", "effect": 0.5,
              "ci_low": 0.4, "ci_high": 0.6, "n": 100, "kept": True, "receiver_inputs": "k"}]
    report = Report("r")
    _structural_text(report.section("s"), tests)
    md, _ = render_markdown(report)
    assert "2 head / MLP site(s)" in md and "1 path(s)" in md and "1 node(s) and 1 edge(s)" in md
    assert "tested apart 1 time(s) (`split_inputs`), 1 kept" in md and "| x0.pre@x1 | a1.0@x1 (k only) |" in md
    assert "| m0@x1 | (the node itself) | y1 | 0.420 [0.330, 0.520] | 100 |" in md and "a0.0@x1" not in md
    empty = Report("r")
    _structural_text(empty.section("s"), None)
    assert "zero ablation" not in render_markdown(empty)[0]
