"""InversionView for tasks that do not ship with circuitkit: a task file and a prompt-pairs JSONL go through the
whole chain, decoder train -> decoder eval -> invert -> hypothesize --source decoder -> verify -> circuit ->
serve --decoder, with no --task after the step that first names the task; then a case TOML naming the task
file runs end to end in --quick mode with decoder panels in its report."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from circuitkit.cli import main

USER_FILE = Path(__file__).parent / "user_tasks" / "first_digit.py"
EPS = 0.1


def _run(capsys, argv: list[str]) -> dict:
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _decoder(model: Path, out: Path, sites: str, task: list[str] | None = None) -> None:
    """A small decoder (300 steps, width 64) on the sites the task forces: enough to hit ε there."""
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["decoder", "train", str(model), *(task or []), "--out", str(out), "--steps", "300", "--d-model",
                   "64", "--sites", sites, "--final-eval-queries", "0", "--quiet", "--threads", "1"])
    assert rc == 0


def _chain(capsys, tmp: Path, model: Path, dec: Path, query: str, forced: dict[str, str], feature: str,
           inputs: int) -> dict:
    """decoder eval, invert, hypothesize --source decoder, verify and circuit, none with --task; checks what
    each must show and returns the JSON each wrote."""
    ev = _run(capsys, ["decoder", "eval", str(dec), "--queries", "10", "--per-cell", "16"])
    assert ev["min_hit_rate"] >= 0.5, ev
    site = next(iter(forced))
    inv = _run(capsys, ["invert", str(dec), "--site", site, "--input", query, "--per-cell", "32", "--show", "20"])
    assert inv["hit"] and inv["samples"][0]["distance"] <= EPS and inv["samples"][0]["in_eps"]
    assert all(s["distance"] <= EPS for s in inv["samples"] if s["in_eps"])
    hyp, ver = tmp / "hyp.json", tmp / "ver.json"
    sites = ",".join(s.split("@")[0] for s in forced)
    position = site.split("@")[1]
    h = _run(capsys, ["hypothesize", str(model), "--source", "decoder", "--decoder", str(dec), "--sites", sites,
                      "--positions", position, "--queries", "10", "--out", str(hyp)])
    assert h["source"] == "decoder"
    accepted = {(x["site"], x["feature"]) for x in h["hypotheses"] if x["accepted"]}
    assert any(s in forced and f == feature for s, f in accepted), accepted
    v = _run(capsys, ["verify", str(model), "--hypotheses", str(hyp), "--inputs", str(inputs), "--pairs", "50",
                      "--out", str(ver)])
    together = {" & ".join(p) for p in itertools.permutations(forced)}
    good = [x for x in v["verdicts"] if x["verified"] and x["features"] == [feature]
            and (x["site"] in forced or (x["site"] in together and x["split"] == "confirm"))]
    # a verified test clears the rule at its level: IIA on the answer, or the graded IIA at the logit level
    assert good and all(x["targets"][0]["iia" if x["level"] == "answer" else "graded_iia"]["ci_low"] >= 0.8
                        for x in good), v["verdicts"]
    c = _run(capsys, ["circuit", str(model), "--verified", str(ver), "--out", str(tmp / "circuit"), "--inputs",
                      str(inputs), "--eval-inputs", "100", "--no-picture"])
    assert c["evaluation"]["faithfulness_normalized"]["all"] >= 0.9
    return {"hypotheses": h, "verification": v}


def _serve_preimage(model: Path, dec: Path, text: str, site: str, position: int) -> dict:
    """`circuitkit serve MODEL --decoder DEC` (no --task) answers a preimage request over HTTP."""
    cmd = [sys.executable, "-m", "circuitkit.cli", "serve", str(model), "--decoder", str(dec), "--port", "0",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, line + (proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        body = json.dumps({"input": text, "site": site, "position": position, "samples": 128}).encode()
        request = urllib.request.Request(f"{url}api/preimage", data=body, method="POST",
                                         headers={"Origin": url.rstrip("/")})  # as the explorer's own page sends it
        with urllib.request.urlopen(request, timeout=60) as r:
            job = json.loads(r.read())["job"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{url}api/jobs/{job}", timeout=60) as r:
                state = json.loads(r.read())
            if state["state"] != "running":
                return state
            time.sleep(0.2)
        raise AssertionError("the preimage job did not finish in 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# ---- a task file -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def file_task(tmp_path_factory):
    """`model train FILE.py:Class` (where the user names the task), then a decoder for the heads at '='."""
    root = tmp_path_factory.mktemp("file_chain")
    shutil.copy(USER_FILE, root / "first_digit.py")
    model, dec = root / "model", root / "decoder"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["model", "train", f"{root / 'first_digit.py'}:FirstDigitTask", "--out", str(model), "--quiet",
                     "--threads", "1"]) == 0
    _decoder(model, dec, "a0.0,a0.1")
    return root, model, dec


def test_a_task_file_goes_through_the_whole_inversionview_chain(file_task, tmp_path, capsys):
    root, model, dec = file_task
    ref = json.loads((dec / "decoder.json").read_text())["task_ref"]
    assert ref["spec"] == f"{(root / 'first_digit.py').resolve()}:FirstDigitTask" and len(ref["file_sha256"]) == 64
    out = _chain(capsys, tmp_path, model, dec, "B31402=3E", {"a0.0@=": "", "a0.1@=": ""}, "first", 600)
    for artefact in out.values():  # every artefact names the task by its full reference, not its bare name
        assert artefact["task_ref"] == ref
    state = _serve_preimage(model, dec, "B31402=3E", "a0.0", 6)
    assert state["state"] == "done", state
    result = state["result"]
    assert result["n_samples"] >= 128 and result["samples"][0]["distance"] <= EPS


def test_a_hypotheses_file_of_another_task_is_refused(file_task, tmp_path, capsys):
    _, model, _ = file_task
    other = tmp_path / "other.json"
    assert main(["hypothesize", str(model), "--sites", "a0.0", "--positions", "=", "--queries", "5", "--pool", "300",
                 "--out", str(other)]) == 0
    data = json.loads(other.read_text())
    data["task_ref"] = {"spec": "counting"}
    other.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["verify", str(model), "--hypotheses", str(other)]) == 2
    assert "was made for task 'counting'" in capsys.readouterr().err


def test_a_case_toml_naming_a_task_file_runs_quick_with_decoder_panels(file_task, tmp_path):
    root, model, dec = file_task
    case = root / "my_case.toml"
    case.write_text('name = "first_digit"\ntask = "first_digit.py:FirstDigitTask"\nseed = 0\n\n'
                    '[model]\nsource = "path"\npath = "model"\n\n[decoder]\nsites = ["a0.0", "a0.1"]\n\n'
                    '[inversion]\nqueries = ["a0.0@=|B31402=3E"]\nquick_queries = ["a0.0@=|B31402=3E"]\n\n'
                    '[hypotheses]\nsource = "decoder"\nquick_source = "decoder"\nquick_queries = 10\nquick_pairs = 50\n'
                    'quick_verify_inputs = 600\nquick_eval_inputs = 200\nquick_screen_examples = 100\n')
    report = tmp_path / "report"
    rc = main(["run", str(case), "--quick", "--decoder", str(dec), "--out", str(report), "--work",
               str(tmp_path / "work"), "--threads", "1", "--quiet"])
    assert rc == 0
    html = (report / "index.html").read_text()
    assert html.count('class="ivpanel"') >= 1 and "B31402=3E" in html
    circuit = json.loads((report / "results.json").read_text())["circuit"]
    assert circuit["source"] == "decoder" and circuit["summary"]["n_learned_nodes"] >= 1  # decoder-sourced, verified
    manifest = json.loads((report / "manifest.json").read_text())
    assert "first_digit.py:FirstDigitTask" in json.dumps(manifest)


# ---- a prompt-pairs task --------------------------------------------------------------------------------------

FIRSTS = ["Mary", "John", "Alice", "Bob", "Sara", "Tom"]
PLACES = ["park", "shop", "school", "lake"]
OBJECTS = ["ball", "book", "cake", "kite"]
TEMPLATE = "[A:{a}] met [B:{b}] at the [P:{p}] with a [O:{o}] and then the first was"
SPAN = re.compile(r"\[\w+:([^\]]+)\]")


@pytest.fixture(scope="module")
def pairs_task(tmp_path_factory):
    """A user's own HF model and tokenizer that answer "who came first", and their prompt pairs (the
    counterfactual swaps the first name): 192 rows, 384 prompts.  The model is trained here with plain
    transformers, as a user would have trained theirs; it records no circuitkit task."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pairs_chain")
    words = ["met", "at", "with", "a", "and", "then", "the", "first", "was", *PLACES, *OBJECTS]
    vocab = ["<|endoftext|>", *FIRSTS, *(f"Ġ{w}" for w in words + FIRSTS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     unk_token="<|endoftext|>")
    rng, rows = random.Random(0), []
    for b, p, o in itertools.product(FIRSTS, PLACES, OBJECTS):  # each prompt once: first names beside b, paired
        firsts = [n for n in FIRSTS if n != b]
        rng.shuffle(firsts)
        rows += [{"prompt": TEMPLATE.format(a=a, b=b, p=p, o=o), "answer": f" {a}",
                  "counterfactual": TEMPLATE.format(a=c, b=b, p=p, o=o), "counterfactual_answer": f" {c}"}
                 for a, c in zip(firsts[::2], firsts[1::2])]
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = [(SPAN.sub(r"\1", TEMPLATE.format(a=a, b=b, p=p, o=o)), a)
             for (a, b), p, o in itertools.product(itertools.permutations(FIRSTS, 2), PLACES, OBJECTS)]
    ids = torch.tensor([[0, *hf_tok(t)["input_ids"]] for t, _ in texts])  # BOS first, as circuitkit feeds it
    answers = torch.tensor([hf_tok(" " + a)["input_ids"][0] for _, a in texts])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=24, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, -1], answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.save_pretrained(root / "model")
    hf_tok.save_pretrained(root / "model")
    return root, root / "model", jsonl, rows


def test_a_prompt_pairs_task_goes_through_the_whole_inversionview_chain(pairs_task, tmp_path, capsys):
    root, model, jsonl, rows = pairs_task
    dec = tmp_path / "decoder"
    # the model records no task: the decoder is where the user names it, and every later verb reads it from there
    _decoder(model, dec, "a0.0,a0.1", task=["--task", f"prompt_pairs:{jsonl}"])
    assert json.loads((dec / "decoder.json").read_text())["task_ref"] == {"spec": f"prompt_pairs:{jsonl.resolve()}"}
    query = "<|endoftext|>" + SPAN.sub(r"\1", rows[0]["prompt"]) + rows[0]["answer"]
    end = len(SPAN.sub(r"\1", rows[0]["prompt"]).split(" "))  # BOS + one token per word, the last is END
    _chain(capsys, tmp_path, model, dec, query, {"a0.0@END": "", "a0.1@END": ""}, "A", 384)
    state = _serve_preimage(model, dec, query, "a0.0", end)
    assert state["state"] == "done", state
    assert state["result"]["samples"][0]["distance"] <= EPS


@pytest.mark.parametrize("form", ["module", "entry point"])
def test_a_decoder_of_a_module_or_entry_point_task_reloads_its_task(form, file_task, tmp_path, monkeypatch, capsys):
    """The other two plug-in forms: the decoder records `pkg.module:Class` or the installed name, and `decoder eval`
    and `invert` reload that task with no flag."""
    _, model, dec = file_task
    copy = tmp_path / "decoder"
    shutil.copytree(dec, copy)
    spec = "tests.user_tasks.first_digit:FirstDigitTask"
    if form == "entry point":
        dist = tmp_path / "firstdigit_plugin-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: firstdigit-plugin\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[circuitkit.tasks]\nfirst = {spec}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = "first"
    meta = json.loads((copy / "decoder.json").read_text())
    meta["task_ref"] = {"spec": spec}
    (copy / "decoder.json").write_text(json.dumps(meta))
    ev = _run(capsys, ["decoder", "eval", str(copy), "--queries", "5", "--per-cell", "8", "--sites", "a0.0"])
    assert ev["sites"][0]["n_queries"] == 5
    inv = _run(capsys, ["invert", str(copy), "--site", "a0.0@=", "--input", "B31402=3E", "--per-cell", "16"])
    assert inv["hit"]
