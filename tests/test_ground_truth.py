"""A circuit scored against a compiled program's ground truth (``discovery/ground_truth.py``), on the committed
tracr-reverse model (no tracr needed): what resample ablation can move is measured on the model, and precision,
recall and labels follow from the circuit's nodes and edges."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from circuitkit.discovery.ground_truth import moved_components, read_truth, score_against_truth
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import load_probed

MODEL = Path(__file__).resolve().parents[1] / "case_studies" / "models" / "tracr_reverse"


def _node(site: str, *features: str) -> dict:
    return {"id": site, "kind": "site", "features": list(features)}


def test_same_layout_resampling_moves_only_the_head_that_writes_reverse():
    pm = load_probed(MODEL)
    truth = read_truth(MODEL)
    moved = moved_components(pm, truth, n=100, seed=0)
    assert set(moved) == {"a0.0", "m0", "m1", "m2", "a3.0"}
    # the length sub-circuit (a0.0, m0) and the index arithmetic (m1, m2) are constant at a fixed length
    assert moved["a3.0"] > 0.5 and all(moved[c] == 0.0 for c in ("a0.0", "m0", "m1", "m2"))


def test_precision_recall_and_labels_against_the_visible_and_the_full_truth():
    truth = read_truth(MODEL)
    moved = {"a0.0": 0.0, "m0": 0.0, "m1": 0.0, "m2": 0.0, "a3.0": 1.0}
    nodes = [_node("x0.pre@x1", "tokens"), _node("x2.post@x1", "tokens"), _node("a3.0@x1", "reverse_1"),
             {"id": "out:y1", "kind": "output"}]
    edges = [{"source": "x0.pre@x1", "target": "a3.0@x1"}, {"source": "x2.post@x1", "target": "a3.0@x1"},
             {"source": "a3.0@x1", "target": "out:y1"}]
    score = score_against_truth(truth, moved, nodes, edges)
    assert score.visible_components == ["a3.0"] and score.bundles == 1
    assert score.nodes["visible"] == {"precision": 1.0, "recall": 1.0, "missed": [], "extra": []}
    assert score.nodes["full"]["recall"] == 0.2 and score.nodes["full"]["missed"] == ["a0.0", "m0", "m1", "m2"]
    assert score.edges["visible"]["precision"] == score.edges["visible"]["recall"] == 1.0
    assert score.edges["full"]["recall"] == round(2 / 9, 4) and "m2 → a3.0" in score.edges["full"]["missed"]
    assert score.labels_right == (3, 3) and len(score.notes) == 4
    # a label the program does not put there, and a component the ablation cannot see, both count against
    wrong = score_against_truth(truth, moved, [*nodes[:2], _node("a3.0@x1", "tokens"), _node("m1@x1", "indices"),
                                               nodes[3]], edges)
    assert wrong.labels_right == (2, 4)
    assert [r["site"] for r in wrong.labels if not r["right"]] == ["a3.0@x1", "m1@x1"]
    assert wrong.nodes["visible"]["precision"] == 0.5 and wrong.nodes["visible"]["extra"] == ["m1"]
    assert json.loads(json.dumps(wrong.to_dict()))["labels_total"] == 4
    # selector_width's head writes a one-to-one code of the width: its variable's name is a right label, another not
    coded = score_against_truth(truth, moved, [_node("a0.0@x1", "length_5"), _node("a0.0@x2", "opp_idx_4")], [])
    assert [r["right"] for r in coded.labels] == [True, False]


def test_a_model_without_truth_gives_none_and_a_broken_truth_is_named(tmp_path):
    assert read_truth(tmp_path) is None and read_truth(None) is None
    d = tmp_path / "m"
    shutil.copytree(MODEL, d)
    (d / "ground_truth.json").write_text("{not json")
    with pytest.raises(CircuitkitError, match="ground_truth.json' is not valid JSON"):
        read_truth(d)
    (d / "ground_truth.json").write_text(json.dumps({"components": {}}))
    with pytest.raises(CircuitkitError, match="lacks 'components' and 'edges'"):
        read_truth(d)


def test_a_label_that_is_the_same_partition_as_the_variable_held_there_counts_as_its_alias():
    """tracr_frac_prevs: at x1 the running fraction frac_prevs_1 is map_3 (tokens == 'x') on every input, at x2 it
    is not; the MLP m0 writes map_3."""
    from circuitkit.discovery.ground_truth import same_partition

    model = MODEL.parent / "tracr_frac_prevs"
    truth, variables = read_truth(model), load_probed(model).task.variables
    assert same_partition(variables, "frac_prevs_1", "map_3", 1) and not same_partition(variables, "frac_prevs_1",
                                                                                         "map_3", 2)
    nodes = [_node("m0@x1", "frac_prevs_1", "map_3"), _node("m0@x2", "frac_prevs_1")]
    score = score_against_truth(truth, {"m0": 1.0, "a1.0": 1.0}, nodes, [], variables)
    assert [r["right"] for r in score.labels] == [True, False]
    assert score.labels[0]["aliases"] == {"frac_prevs_1": "map_3"} and score.labels[1]["aliases"] == {}
    assert score_against_truth(truth, {"m0": 1.0, "a1.0": 1.0}, nodes[:1], []).labels_right == (0, 1)


def test_an_edge_from_the_embeddings_is_visible_only_where_the_receiver_reads_something_that_moves():
    """frac_prevs: m0 reads the tokens (they move between same-layout pairs); a1.0 reads of the embeddings only the
    positions, `one` and BOS's token direction (they do not), so emb -> a1.0 is out of the visible truth."""
    from circuitkit.discovery.ground_truth import moved_embedding_reads

    model = MODEL.parent / "tracr_frac_prevs"
    pm, truth = load_probed(model), read_truth(model)
    reads = moved_embedding_reads(pm, truth, n=100, seed=0)
    assert set(reads) == {"m0", "a1.0"} and reads["a1.0"] == 0.0 and reads["m0"] > 0.5
    nodes = [_node("x0.pre@x2", "tokens"), _node("m0@x2", "map_3"), _node("a1.0@x2", "frac_prevs_1"),
             {"id": "out:y2", "kind": "output"}]
    edges = [{"source": "x0.pre@x2", "target": "m0@x2"}, {"source": "m0@x2", "target": "a1.0@x2"},
             {"source": "a1.0@x2", "target": "out:y2"}]
    moved = moved_components(pm, truth, n=100, seed=0)
    with_reads = score_against_truth(truth, moved, nodes, edges, embedding_reads=reads)
    assert with_reads.edges["visible"] == {"precision": 1.0, "recall": 1.0, "missed": [], "extra": []}
    assert with_reads.edges["full"]["missed"] == ["emb → a1.0"] and any("emb → a1.0" in n for n in with_reads.notes)
    assert score_against_truth(truth, moved, nodes, edges).edges["visible"]["recall"] == 0.75


def test_sources_of_another_length_move_the_length_sub_circuit_and_its_edges():
    """tracr-reverse: at a fixed length the length sub-circuit is constant, so same-layout resampling moves none of
    it; sources of another length (positions lined up: BOS x1 .. xn is a prefix) move all of it, and exact edge
    patching then scores the chain a0.0 -> m0 -> m1 -> m2 -> a3.0's query that it scored 0 before."""
    from circuitkit.discovery.methods import discover
    from circuitkit.discovery.problem import aligned_pairs, build_problem, moving_edges, positions_line_up

    pm, truth = load_probed(MODEL), read_truth(MODEL)
    bases, sources = aligned_pairs(pm, 40, 0, "any-layout")
    lengths = [(len(pm.task.tokens(b, pad=False)), len(pm.task.tokens(s, pad=False))) for b, s in zip(bases, sources)]
    assert len(bases) == 40 and all(a != b for a, b in lengths)
    assert all(positions_line_up(pm.task, b, s) for b, s in zip(bases, sources))
    moved = moved_components(pm, truth, n=100, seed=0, sources="any-layout")
    assert all(moved[c] > 0.1 for c in ("a0.0", "m0", "m1", "m2", "a3.0"))
    chain = [("a0.h0", "m0"), ("m0", "m1"), ("m1", "m2"), ("m2", "a3.h0<q>")]
    for how, seen in (("same-layout", False), ("any-layout", True)):
        p, record = build_problem(pm, n=60, seed=0, sources=how)
        assert record["source_layout"] == how
        g, moving = p.graph, moving_edges(p)
        idx = [(g.sender_index[s], g.receiver_index[r]) for s, r in chain]
        assert all(bool(moving[i, j]) == seen for i, j in idx)
        scores = discover(p, "exact").scores
        assert all((abs(float(scores[i, j])) > 0.1) == seen for i, j in idx)


def test_compare_ranks_against_the_truth_the_ablation_can_move_and_names_the_rest(tmp_path, capsys):
    """Position reads of the embeddings (a3.0's query and key, m1's input) move under no resample ablation: the
    comparison lists them and leaves them out of the visible ranking, where exact patching then ranks well."""
    import json as _json

    from circuitkit.cli import main

    model, disc, cmp_dir = str(MODEL), tmp_path / "disc", tmp_path / "cmp"
    common = ["--sources", "any-layout", "--n", "40"]
    assert main(["discover", model, "--method", "exact", *common, "--seed", "0", "--out", str(disc)]) == 0
    assert main(["compare", model, str(disc), *common, "--seed", "1", "--out", str(cmp_dir)]) == 0
    capsys.readouterr()
    cmp = _json.loads((cmp_dir / "comparison.json").read_text())
    hidden = set(cmp["invisible_truth_edges"])
    assert {"input->a3.h0<q>", "input->a3.h0<k>", "input->m1"} <= hidden and "a0.h0->m0" not in hidden
    assert cmp["visible_truth_edges"] + len(hidden) == cmp["truth_edges"]
    row = next(r for r in cmp["rows"] if r["method"] == "exact")
    assert row["roc_auc_visible"] > 0.9 > row["roc_auc"]
    # the whole truth's ranking is capped: every invisible edge scores 0, at best tied with every negative
    ceiling = (cmp["visible_truth_edges"] + 0.5 * len(hidden)) / cmp["truth_edges"]
    assert cmp["roc_auc_ceiling"] == pytest.approx(ceiling, abs=1e-4) and row["roc_auc"] <= ceiling + 1e-9
    assert "moves nothing along" in (cmp_dir / "comparison.md").read_text()


def test_a_task_whose_other_layouts_do_not_line_up_is_refused_any_layout_sources(tiny_counting_model, tmp_path,
                                                                                  capsys):
    """Counting's query and answer move with the string's length: no input of another layout has its named
    positions where the base has them, so ``any-layout`` is refused with the valid choice named, exit 2."""
    from circuitkit.cli import main
    from circuitkit.discovery.problem import aligned_pairs

    with pytest.raises(CircuitkitError, match="another layout.*same-layout"):
        aligned_pairs(tiny_counting_model, 10, 0, "any-layout")
    model, out = str(tiny_counting_model.path), tmp_path / "bad"
    assert main(["discover", model, "--method", "eap", "--sources", "anything", "--n", "8", "--out", str(out)]) == 2
    assert "same-layout, any-layout" in capsys.readouterr().err and not out.exists()
