"""The prompt-pairs task: a user's JSONL of prompts and counterfactuals on a model with its own HF tokenizer
(here a tiny random GPT-2 with a word-level byte tokenizer saved by transformers), through patch --sweep
and verify --claim, plus the errors a malformed file gets."""
from __future__ import annotations

import json
import random

import pytest

from circuitkit.cli import main
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import load_probed


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_spans_become_positions_features_and_the_counterfactual_contrast(pairs_model):
    model_dir, jsonl = pairs_model
    pm = load_probed(model_dir, task=f"prompt_pairs:{jsonl}")
    task = pm.task
    assert task.position_names == ("BOS", "IO", "S", "PLACE", "S2", "OBJ", "END")
    text = task.split("test")[0]
    toks = task.tokens(text)
    pos = task.positions(toks)
    assert toks[pos["S2"]] == "Ġ" + task.features()["S2"](toks) and toks[pos["END"]] == "Ġto"
    other = task.contrast_minimal(text, random.Random(0))
    t_other = task.tokens(other)
    assert task.features()["S2"](t_other) != task.features()["S2"](toks)  # S2 flipped, everything else equal
    assert [a for i, a in enumerate(toks) if i != pos["S2"]][:-1] == [b for i, b in enumerate(t_other) if i != pos["S2"]][:-1]
    target = task.target(toks)
    assert (target.token, target.wrong) == (task.target(t_other).wrong, task.target(t_other).token)
    assert len(task.split("train")) + len(task.split("test")) == 120 and not set(task.split("train")) & set(
        task.split("test"))


def test_sweep_and_claim_run_end_to_end(pairs_model, capsys):
    model_dir, jsonl = pairs_model
    task = ["--task", f"prompt_pairs:{jsonl}"]
    rc, out, err = _run(capsys, ["patch", str(model_dir), *task, "--sweep", "head", "--n", "16", "--contrast",
                                 "minimal", "--json", "--quiet"])
    assert rc == 0, err
    d = json.loads(out)
    assert d["axes"] == ["layer", "pos", "head"] and d["shape"][0] == 2 and d["shape"][2] == 2
    pm = load_probed(model_dir, task=f"prompt_pairs:{jsonl}")
    s2 = pm.task.positions(pm.task.tokens(pm.task.split("test")[0]))["S2"]
    mean = d["mean"]
    for layer in range(2):  # the minimal contrast differs only at S2: patching any earlier position changes nothing
        for p in range(s2):
            assert all(abs(mean[layer][p][h] - d["base_mean"]) < 1e-6 for h in range(2)), (layer, p)
    assert any(abs(mean[layer][s2][h] - d["base_mean"]) > 1e-6 for layer in range(2) for h in range(2))
    rc, out, err = _run(capsys, ["verify", str(model_dir), *task, "--claim", "a1.0@END", "IO", "--inputs", "60",
                                 "--pairs", "20", "--json"])
    assert rc == 0, err
    v = json.loads(out)
    assert v["verdicts"][0]["site"] == "a1.0@END" and v["verdicts"][0]["features"] == ["IO"]
    assert not v["verdicts"][0]["verified"]  # a random model routes nothing


@pytest.mark.parametrize("mutate,message", [
    (lambda rows: rows[:5], r"holds 5 rows; at least 10"),
    (lambda rows: [{**rows[0], "answer": ""}] + rows[1:], r"row 1: missing or empty answer|line 1: missing or empty answer"),
    (lambda rows: [{**rows[0], "counterfactual_answer": rows[0]["answer"]}] + rows[1:], r"start with the same token"),
    (lambda rows: [{**rows[0], "prompt": rows[0]["prompt"].replace("[OBJ:", "[IO:")}] + rows[1:], r"used twice"),
    (lambda rows: [{**rows[0], "prompt": rows[0]["prompt"] + " ["}] + rows[1:], r"not part of a \[NAME:text\] span"),
    (lambda rows: rows + [rows[3]], r"row 61: its prompt .* repeats one of an earlier row"),
])
def test_malformed_pair_files_are_named(pairs_model, tmp_path, mutate, message):
    model_dir, jsonl = pairs_model
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in mutate(rows)) + "\n")
    with pytest.raises(CircuitkitError, match=message):
        load_probed(model_dir, task=f"prompt_pairs:{bad}")


def test_a_prompt_pairs_task_needs_a_model(pairs_model):
    from circuitkit.tasks import get_task

    with pytest.raises(CircuitkitError, match=r"tokenizes with the model's own tokenizer"):
        get_task(f"prompt_pairs:{pairs_model[1]}")
