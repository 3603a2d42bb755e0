"""The task's causal model (``verification/causal.py``): an index variable, whose effect on the answer is a
lookup into the base's other tokens, is verified at the sites that carry it, which the data-driven answer
model g(f, D) cannot do; the controls that could fail stay clean."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from circuitkit.cli import main
from circuitkit.models.checkpoint import load_probed
from circuitkit.tasks.base import Task
from circuitkit.verification.causal import TOKEN_EDIT, answers_any_input, realisations, token_editable
from circuitkit.verification.interchange import InterchangeVerifier
from tests.user_tasks.pointer import PointerTask

POINTER_FILE = Path(__file__).parent / "user_tasks" / "pointer.py"


@pytest.fixture(scope="module")
def pointer_model(tmp_path_factory):
    """`model train pointer.py:PointerTask` with the task's recipe (2L, 2H, d48, mimetic init, 3,000 steps), on one
    thread: the same seed then gives the same model (with two, the summation order differs, and so does the
    model: it then spreads the index over '=' and the pointer's own position after layer 0)."""
    out = tmp_path_factory.mktemp("pointer") / "model"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["model", "train", f"{POINTER_FILE}:PointerTask", "--out", str(out), "--quiet", "--threads",
                     "1"]) == 0
    return out


def test_the_token_edit_copies_the_variables_tokens_from_the_source():
    task = PointerTask()
    feats = task.features()
    base, source = task.tokens("B31402c=4E"), task.tokens("B00000a=0E")
    [edited] = realisations(task, feats, ["index"], base, source, 7)
    assert "".join(edited[:10]) == "B31402a=4E"  # the pointer from the source, everything else from the base
    assert task.answers(edited) == {"answer": task.vocab.id_of("3")}  # the base's first digit: a lookup
    from circuitkit.hypotheses.features import all_features

    rel = all_features(task)
    assert realisations(task, rel, ["tok@p-1"], base, source, 7) == [edited]  # the token before '=' is the pointer
    # the looked-up digit is not a token-level variable (it declares no reads): the data-driven model takes it
    assert token_editable(task, feats, ["index"]) and not token_editable(task, feats, ["pointed"])


def test_an_index_variable_is_verified_where_it_is_carried_and_not_where_the_lookup_is_done(pointer_model,
                                                                                           capsys):
    rc = main(["verify", str(pointer_model), "--claim", "x0.pre@PTR", "index", "--claim", "x0.post@=", "index",
               "--claim", "x1.mid@=", "index", "--inputs", "2000", "--pairs", "150", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rep = json.loads(out.out)
    nodes = {n["site"]: n for n in rep["nodes"]}
    for site in ("x0.pre@PTR", "x0.post@="):  # the pointer's own token, and the stream at '=' after layer 0
        assert site in nodes and nodes[site]["features"] == ["index"] and not nodes[site]["architectural"]
        assert nodes[site]["iia"] >= 0.95 and nodes[site]["iia_ci"][0] >= 0.9, nodes[site]
        assert nodes[site]["prediction"] == [TOKEN_EDIT]
    # after layer 1 the stream at '=' holds the looked-up digit, not the index: a claim that could have passed
    assert "x1.mid@=" not in nodes
    verdict = next(v for v in rep["verdicts"] if v["site"] == "x1.mid@=")
    assert verdict["targets"][0]["answer_model"]["method"] == TOKEN_EDIT
    controls = rep["controls_summary"]
    assert controls["shuffled_feature"]["tested"] >= 2 and controls["shuffled_feature"]["verified"] == 0
    assert controls["random_model"]["verified"] == 0  # learned, not true by construction


def test_without_the_causal_model_the_index_variable_predicts_nothing(pointer_model):
    """The data-driven fallback g(f, D), D <= 2 task features, cannot express a lookup: the same claim is then
    unverifiable, which is why the causal model exists."""

    class NoCausalModel(PointerTask):
        answers = Task.answers

    pm = load_probed(pointer_model)
    assert answers_any_input(pm.task)
    plain = dataclasses.replace(pm, task=NoCausalModel())
    assert not answers_any_input(plain.task)
    verifier = InterchangeVerifier(plain, n_inputs=2000, n_pairs=100)
    verdict = verifier.test("x0.post@=", ["index"])
    assert not verdict.verified and "predicts no answer" in verdict.note
