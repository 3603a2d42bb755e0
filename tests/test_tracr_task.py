"""The task a converted tracr model records (``tasks/tracr.py``): found from the directory alone, data only, answers
in the output vocabulary; patch and verify run on it with no flag (issue 31).  Needs no tracr: the committed
``case_studies/models/tracr_reverse`` is the model."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitkit.cli import main
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import load_probed
from circuitkit.tasks.registry import load_task, task_identity, task_record
from circuitkit.tasks.tracr import TracrTask

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "case_studies" / "models" / "tracr_reverse"


@pytest.fixture(scope="module")
def pm():
    return load_probed(MODEL)


def _copy_with(tmp_path: Path, edit) -> Path:
    """A copy of the committed model whose task.json ``edit`` changed (circuitkit.json records the new sha256)."""
    d = tmp_path / "model"
    shutil.copytree(MODEL, d)
    data = json.loads((d / "task.json").read_text())
    edit(data)
    (d / "task.json").write_text(json.dumps(data))
    meta = json.loads((d / "circuitkit.json").read_text())
    meta["task_ref"]["task_sha256"] = hashlib.sha256((d / "task.json").read_bytes()).hexdigest()
    (d / "circuitkit.json").write_text(json.dumps(meta))
    return d


def test_the_committed_model_finds_its_task_without_jax_or_tracr():
    code = ("import sys; from circuitkit.models.checkpoint import load_probed; "
            f"pm = load_probed({str(MODEL)!r}); "
            "print(type(pm.task).__name__, pm.task.name, len(pm.task.split('test')), "
            "any(m.split('.')[0] in ('jax', 'tracr', 'haiku') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["TracrTask", "tracr_reverse", "363", "False"]


def test_the_record_is_data_and_names_the_models_own_directory(pm):
    meta = json.loads((MODEL / "circuitkit.json").read_text())
    assert meta["task_ref"] == {"spec": "tracr:", "task_sha256": pm.task.sha256}
    assert task_record(pm.task) == meta["task_ref"]
    assert task_identity(pm.task) == {"tracr_task_sha256": pm.task.sha256}
    assert not list(MODEL.glob("*.py"))  # nothing in the directory is code
    same = load_task("tracr:models/tracr_reverse", base_dir=ROOT / "case_studies")
    assert isinstance(same, TracrTask) and same.sha256 == pm.task.sha256
    with pytest.raises(CircuitkitError, match="the task recorded in the model's own directory"):
        load_task("tracr:")


@torch.no_grad()
def test_answers_are_output_vocabulary_indices_equal_to_the_models_greedy_outputs(pm):
    task = pm.task
    texts = list(task.split("test"))
    assert len(texts) == 3 + 9 + 27 + 81 + 243 and task.output_tokens == ("1", "2", "3")
    logits = pm.runner.logits(task.encode(texts))  # right-padded batch of every length
    assert logits.shape[-1] == 3 == len(task.output_tokens) != len(task.vocab)
    for i, text in enumerate(texts):
        targets = task.targets(task.tokens(text))
        body = text.split()[1:]
        assert [t.position for t in targets] == list(range(1, len(body) + 1))
        assert [task.answer_text(t.token) for t in targets] == body[::-1]  # reverse, in the output vocabulary
        assert [int(logits[i, t.position].argmax()) for t in targets] == [t.token for t in targets]


def test_features_name_the_rasp_variables(pm):
    task, toks = pm.task, pm.task.tokens("BOS 1 2 3")
    feats = task.features()
    assert {"tokens", "indices", "length"} <= set(feats)
    names = {n.rsplit("_", 1)[0] for n in feats if "_" in n}
    assert {"opp_idx", "reverse", "length"} <= names
    reverse = next(f for n, f in feats.items() if n.startswith("reverse_"))
    assert [reverse(toks, p) for p in (1, 2, 3)] == [3, 2, 1] and reverse(toks, 0) is None
    assert feats["length"](toks) == 3 and task.positions(toks) == {"BOS": 0, "x1": 1, "x2": 2, "x3": 3}
    edit = task.contrast_minimal("BOS 1 2 3", random.Random(0))
    assert len(edit.split()) == 4 and task.targets(task.tokens(edit))[0].token != 2


def test_patch_and_verify_run_with_no_flag(capsys):
    assert main(["patch", str(MODEL), "--site", "a3.0@x2", "--base", "BOS 1 2 3", "--source", "BOS 1 3 3",
                 "--target", "y2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["clean"]["mean"] == pytest.approx(1.0, abs=1e-4) and d["patched"]["mean"] == pytest.approx(-1.0, abs=1e-4)
    assert main(["verify", str(MODEL), "--claim", "a3.0@x1", "reverse_1", "--inputs", "400", "--pairs", "40",
                 "--no-controls", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["task_ref"]["spec"] == "tracr:" and v["n_learned_nodes"] == 1


def test_an_input_outside_the_table_is_named(tmp_path, capsys):
    d = _copy_with(tmp_path, lambda data: data["answers"].pop("1 2 3"))
    task = load_probed(d).task
    with pytest.raises(CircuitkitError, match=r"has no entry for 'BOS 1 2 3': it holds the program's answers"):
        task.targets(task.tokens("BOS 1 2 3"))
    assert task.answers(task.tokens("BOS 1 2 1")) == {"y1": 0, "y2": 1, "y3": 0}
    assert main(["patch", str(d), "--site", "a3.0@x1", "--base", "BOS 1 2 3"]) != 0
    assert "has no entry for 'BOS 1 2 3'" in capsys.readouterr().err
    assert main(["patch", str(MODEL), "--site", "a3.0@x1", "--base", "BOS 1 2 4"]) != 0
    assert "tokens ['4'] are not in the vocabulary" in capsys.readouterr().err


def test_a_changed_task_file_and_a_numerical_output_without_its_readout_are_refused(tmp_path):
    d = _copy_with(tmp_path, lambda data: data.update(output="numerical"))
    with pytest.raises(CircuitkitError, match="read through its nearest-value readout, which this task file does not"):
        load_probed(d)
    (d / "task.json").write_text((MODEL / "task.json").read_text())  # not the file circuitkit.json records
    with pytest.raises(CircuitkitError, match="was made for another tracr task"):
        load_probed(d)


@torch.no_grad()
def test_a_numerical_program_is_read_as_the_nearest_of_its_values_through_one_scalar():
    """tracr_frac_prevs (committed): argmax of the readout is the program's value on all 1,364 inputs, and every
    output unit i, s (2 c_i v - c_i^2), gives back the same scalar v, within 0.01 of that value: a logit difference
    is a scaled output-value difference."""
    pm = load_probed(ROOT / "case_studies" / "models" / "tracr_frac_prevs")
    task, runner = pm.task, pm.runner
    values = torch.tensor([float(t) for t in task.output_tokens])  # [K]
    scale = json.loads((pm.path / "tracr.json").read_text())["readout_scale"]
    texts = task.split("test")
    assert len(texts) == 1364
    ids = task.encode(texts)  # [n, seq]
    logits = runner.logits(ids)  # [n, seq, K]
    for row, text in zip(logits, texts, strict=True):
        answers = task.lookup(task.tokens(text, pad=False))
        out = row[1:len(answers) + 1]  # [len, K]
        assert out.argmax(-1).tolist() == answers
        v = (out[:, values != 0] / scale + values[values != 0] ** 2) / (2 * values[values != 0])  # [len, K-1]
        assert torch.allclose(v, v[:, :1].expand_as(v), atol=1e-3)
        assert (v[:, 0] - values[answers]).abs().max() < 0.01


FRAC = ROOT / "case_studies" / "models" / "tracr_frac_prevs"


def test_a_coarse_token_variable_is_set_by_every_token_that_gives_its_value():
    """map_3 = (tokens == 'x') is a function of the token at its position on every input, so the causal model sets
    it by token edits: to 1 only by 'x', to 0 by any of a, b, c, predicting where they all agree; a coarse
    variable whose realisations disagree (any of 'a' / 'x') predicts only the answers that do not depend on which."""
    from circuitkit.tasks.features import PositionalFeature
    from circuitkit.verification.causal import edited_answers, realisations

    task = load_probed(FRAC).task
    feats = task.features()
    assert task.token_maps == {"map_3"} and feats["map_3"].coarse and not feats["tokens"].coarse
    tok = task.tokens
    assert [e[:4] for e in realisations(task, feats, ["map_3"], tok("BOS a b c"), tok("BOS a x c"), 2)] == \
        [["BOS", "a", "x", "c"]]
    assert len(realisations(task, feats, ["map_3"], tok("BOS a x c"), tok("BOS a b c"), 2)) == 3
    assert edited_answers(task, feats, ["map_3"], tok("BOS a x c"), tok("BOS c a c"), 2) == \
        task.answers(tok("BOS a b c"))
    a_or_x = PositionalFeature("a_or_x", lambda t, p: t[p] in ("a", "x"), reads=(0,), coarse=True)
    got = edited_answers(task, {"a_or_x": a_or_x}, ["a_or_x"], tok("BOS b b c"), tok("BOS b a c"), 2)
    assert got == {"y1": task.answers(tok("BOS b b c"))["y1"]}  # y2, y3 differ between 'a' and 'x': no prediction


def test_the_preimages_choose_the_coarser_of_two_labels_that_both_verify(tmp_path, capsys):
    """At m0@x2 the MLP writes map_3: both map_3 and the finer `tokens` pass the interchange test (the answer needs
    only map_3), and the preimages (kappa 1.0 against about 0.5) drop `tokens`; at the embedding x0.pre@x2, which
    holds the token itself, `tokens` stays."""
    hyp = tmp_path / "h.json"
    assert main(["hypothesize", str(FRAC), "--sites", "m0@x2,x0.pre@x2", "--queries", "30", "--pool", "1364",
                 "--out", str(hyp)]) == 0
    capsys.readouterr()
    assert main(["verify", str(FRAC), "--hypotheses", str(hyp), "--inputs", "1364", "--pairs", "60", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    by_site: dict[str, list[str]] = {}
    for n in rep["nodes"]:
        by_site.setdefault(n["site"], []).extend(n["features"])
    assert "map_3" in by_site["m0@x2"] and "tokens" not in by_site["m0@x2"]
    assert "tokens" in by_site["x0.pre@x2"]
    dropped = rep["settings"]["finer_labels_dropped"]
    assert [d[:3] for d in dropped] == [["m0@x2", "tokens", "map_3"]] and dropped[0][4] > dropped[0][3]
    tested = {(v["site"], tuple(v["features"])): v["verified"] for v in rep["verdicts"]}
    assert tested[("m0@x2", ("tokens",))] and tested[("m0@x2", ("map_3",))]  # both passed the interchange test
