"""Every bad input to every CLI verb is refused cleanly (issue 15).

A clean refusal is: a non-zero exit status, one ``circuitkit: error:`` line naming what was wrong, and
no traceback.  Cases run ``circuitkit.cli.main`` in-process (fast); a few run the real console entry
point in a subprocess to prove the exit-code path.  Property-based cases (hypothesis) generate site
strings, task inputs and TOML values and accept either a clean error or a correct result, never a
traceback and never silent acceptance of something malformed.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import get_origin, get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitkit.cli import main
from circuitkit.errors import CircuitkitError
from circuitkit.pipeline.config import load_case
from circuitkit.sites import parse_site
from circuitkit.tasks import get_task
from tests import bad_files

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "case_studies" / "models"
GOOD_SUM = "B615+861=1476E"
#: a generated example that runs longer than this fails: no input may make circuitkit hang
DEADLINE_MS = 30_000
FAST = settings(max_examples=12, deadline=DEADLINE_MS, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---- running the CLI ----------------------------------------------------------------------------
def cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``circuitkit ARGV`` run in-process; argparse exits count too.

    An exception escaping ``main`` is a traceback the user would see: it fails the test as it is."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def refused(argv: list[str], *needles: str) -> str:
    """Assert ``argv`` is refused cleanly with every ``needle`` (a regex) in the message; return it."""
    rc, _, err = cli(argv)
    assert rc != 0, f"accepted silently: {argv}"
    assert "Traceback" not in err, err
    assert re.search(r"(circuitkit: error: |error: argument )", err), f"no error line: {err!r}"
    if "circuitkit: error: " in err:
        assert err.startswith("circuitkit: error: ") and err.strip().count("\n") == 0, f"not one line: {err!r}"
    for n in needles:
        assert re.search(n, err), f"{n!r} not in {err!r}"
    return err


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def add_model(work) -> Path:
    """A copy of the committed addition model (2L/4H/d32; manifest.json with checksums)."""
    return bad_files.copy_dir(MODELS / "addition", work / "addition")


@pytest.fixture(scope="module")
def count_model(work) -> Path:
    return bad_files.copy_dir(MODELS / "counting", work / "counting")


@pytest.fixture(scope="module")
def decoder(add_model, work) -> Path:
    """A tiny decoder (a few steps) for the addition model: enough to reach every decoder code path."""
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
    from circuitkit.models.checkpoint import load_probed

    out = work / "decoder"
    cfg = DecoderTrainConfig(steps=2, d_model=16, n_heads=2, cond_mid=32, n_cond_blocks=1, batch_size=8, warmup=1,
                             eval_every=50, eval_queries=2, eval_per_cell=1, final_eval_queries=0)
    train_decoder(load_probed(add_model), out, cfg, sites=[parse_site("x0.pre"), parse_site("a1.0")], progress=False)
    return out


@pytest.fixture(scope="module")
def a_file(work) -> Path:
    f = work / "a_file.txt"
    f.write_text("not a directory\n")
    return f


@pytest.fixture(scope="module")
def a_dir(work) -> Path:
    d = work / "a_dir"
    d.mkdir(exist_ok=True)
    (d / "keep.txt").write_text("x")
    return d


def damaged_model(src: Path, dst: Path, how: str) -> Path:
    """A copy of checkpoint ``src`` damaged one way (see the cases below)."""
    d = bad_files.copy_dir(src, dst)
    st_file = d / "model.safetensors"
    actions = {
        "n_layer_3": lambda: bad_files.edit_json(d / "config.json", n_layer=3),
        "n_layer_1": lambda: bad_files.edit_json(d / "config.json", n_layer=1),
        "n_embd_64": lambda: (bad_files.edit_json(d / "config.json", n_embd=64), bad_files.drop_checksums(d)),
        "n_head_3": lambda: bad_files.edit_json(d / "config.json", n_head=3),
        "scrambled": lambda: bad_files.scramble_tail(st_file),
        "truncated": lambda: bad_files.truncate(st_file),
        "truncated_no_manifest": lambda: (bad_files.truncate(st_file), (d / "manifest.json").unlink()),
        "garbage_weights": lambda: (bad_files.garbage(st_file), (d / "manifest.json").unlink()),
        "empty_weights": lambda: (st_file.write_bytes(b""), (d / "manifest.json").unlink()),
        "meta_non_utf8": lambda: bad_files.non_utf8(d / "circuitkit.json"),
        "meta_not_json": lambda: (d / "circuitkit.json").write_text("{task: addition"),
        "meta_a_list": lambda: (d / "circuitkit.json").write_text("[1, 2]"),
        "config_non_utf8": lambda: bad_files.non_utf8(d / "config.json"),
        "config_not_json": lambda: (d / "config.json").write_text("{not json"),
        "manifest_non_utf8": lambda: bad_files.non_utf8(d / "manifest.json"),
        "nan_weights": lambda: bad_files.nan_weights(d),
        "no_weights": lambda: st_file.unlink(),
    }
    actions[how]()
    return d


# ---- checkpoints: every file a model load reads -------------------------------------------------
MODEL_DAMAGE = [
    ("n_layer_3", r"missing 12 tensor\(s\): h\.2\."),  # the silent extra random layer
    ("n_layer_1", r"12 extra tensor\(s\): h\.1\."),
    ("n_embd_64", r"wrong shape: .*config wants"),
    ("n_head_3", r"n_embd 32 is not divisible by n_head 3"),
    ("scrambled", r"does not match the sha256 recorded"),
    ("truncated", r"truncated"),
    ("truncated_no_manifest", r"truncated"),
    ("garbage_weights", r"not a valid safetensors file"),
    ("empty_weights", r"empty \(0 bytes\)"),
    ("meta_non_utf8", r"circuitkit\.json' is not UTF-8"),
    ("meta_not_json", r"corrupt \(not JSON"),
    ("meta_a_list", r"expected a JSON dict"),
    ("config_non_utf8", r"config\.json' is not UTF-8"),
    ("config_not_json", r"config\.json.*corrupt"),
    ("manifest_non_utf8", r"manifest\.json' is not UTF-8"),
    ("nan_weights", r"NaN or infinite values \(transformer\.wte\.weight\)"),
    ("no_weights", r"has no weights"),
]


@pytest.mark.parametrize("how,message", MODEL_DAMAGE, ids=[m[0] for m in MODEL_DAMAGE])
def test_model_eval_refuses_damaged_checkpoint(add_model, work, how, message):
    d = damaged_model(add_model, work / f"damaged_{how}", how)
    refused(["model", "eval", d, "--limit", "20", "--quiet"], message)


def test_model_eval_good_checkpoint_still_loads(add_model):
    rc, out, err = cli(["model", "eval", add_model, "--limit", "50", "--quiet", "--json"])
    assert rc == 0, err
    assert json.loads(out)["accuracy"] > 0.9


def test_sites_refuses_mismatched_config(add_model, work):
    d = damaged_model(add_model, work / "sites_nl3", "n_layer_3")
    refused(["sites", d], "does not match")


@pytest.mark.parametrize("argv,message", [
    (["model", "eval", "{m}", "--device", "zz"], r"unknown --device 'zz'; valid: cpu, cuda"),
    (["model", "eval", "{m}", "--device", "cuda:x"], r"unknown --device"),
    (["model", "eval", "{m}", "--device", "cpu:0"], r"unknown --device"),
    (["model", "eval", "{m}", "--limit", "-1"], r"--limit must be >= 0"),
    (["model", "eval", "{m}", "--task", "counting"], r"vocab_size"),
    (["model", "eval", "{m}", "--task", "sorting"], r"unknown task 'sorting'"),
    (["model", "eval", "{m}/nope"], r"does not exist"),
    (["model", "eval", "{m}/config.json"], r"is a file"),
    (["sites", "{m}", "--kinds", "zz"], r"unknown site kinds"),
], ids=lambda v: "_".join(v[1:]) if isinstance(v, list) else None)
def test_model_options(add_model, argv, message):
    refused([a.format(m=add_model) for a in argv], message)


@pytest.mark.parametrize("extra,message", [
    (["--out", "{f}"], r"is an existing file"),
    (["--out", "{f}/sub"], r"is a file, not a directory"),
    (["--out", "{m}"], r"exists and is not empty"),
    (["--out", "{new}", "--device", "zz"], r"unknown --device"),
    (["--out", "{new}", "--threads", "0"], r"--threads must be >= 1"),
    (["--out", "{new}", "--eval-limit", "-1"], r"--eval-limit must be >= 1"),
    (["--out", "{new}", "--steps", "0"], r"--steps must be positive"),
    (["--out", "{new}", "--lr", "-1"], r"--lr must be positive"),
    (["--out", "{new}", "--attn-init", "zz"], r"unknown attention init .zz.; valid: normal, mimetic"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_model_train_options(add_model, a_file, work, extra, message):
    args = [a.format(f=a_file, m=add_model, new=work / "never_made") for a in extra]
    refused(["model", "train", "addition", "--quiet", "--steps", "1", *args], message)
    assert not (work / "never_made").exists()


# ---- patch and patch-table ----------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--site", "a1.0@=", "--n", "1000000000"], r"--n must be in \[1, 202500\] \(the addition test split"),
    (["--site", "a1.0@=", "--n", "0"], r"--n must be >= 1"),
    (["--site", "a1.0@=", "--n", "-5"], r"--n must be >= 1"),
    (["--site", "a1.0@=", "--n", "2", "--device", "zz"], r"unknown --device 'zz'"),
    (["--site", "a1.0@=", "--n", "2", "--top", "-1"], r"--top must be >= 0"),
    (["--sweep", "head", "--n", "2", "--top", "-1"], r"--top must be >= 0"),
    (["--site", "a1.0@=", "--n", "2", "--out", "{d}"], r"is an existing directory"),
    (["--site", "a1.0@=", "--n", "2", "--out", "{f}/x.json"], r"is a file, not a directory"),
    (["--site", "a1.0@=", "--base", GOOD_SUM, "--source", "B61+861=922E"], r"--source input 1 .*first operand '61'"),
    (["--site", "a1.0@=", "--base", GOOD_SUM, "--source", "xyz"], r"not in the vocabulary"),
    (["--site", "a1.0@=", "--base", GOOD_SUM, "--source", "B615+861=1477E"], r"answer '1477' is not 615\+861"),
    (["--site", "a1.0@=", "--base", "", "--source", GOOD_SUM], r"--base input 1 is empty"),
    (["--site", "a1.0@=", "--base", "B615+861=1476EPPPPPPP", "--source", GOOD_SUM], r"more than the task's 14"),
    (["--site", "a1.0@=", "--base", GOOD_SUM, "--source", GOOD_SUM, GOOD_SUM], r"one source per base"),
    (["--site", "a1.0@=", "--n", "2", "--metric", "zz"], r"unknown metric 'zz'; valid"),
    (["--site", "a1.0@=", "--n", "2", "--ablation", "zz"], r"unknown ablation 'zz'; valid"),
    (["--site", "a1.0@=", "--n", "2", "--target", "zz"], r"no target 'zz'"),
    (["--sweep", "zz", "--n", "2"], r"unknown sweep kind"),
    (["--sender", "a0.0@=", "--n", "2"], r"both --sender and --receiver"),
    (["--sender", "a0.0@=", "--receiver", "zz", "--n", "2"], r"cannot parse site 'zz'"),
], ids=lambda v: "_".join(v)[:60] if isinstance(v, list) else None)
def test_patch_options(add_model, a_dir, a_file, extra, message):
    refused(["patch", add_model, *[a.format(d=a_dir, f=a_file) for a in extra]], message)


def test_patch_good_inputs_give_a_result(add_model):
    rc, out, err = cli(["patch", add_model, "--site", "a1.0@=", "--base", GOOD_SUM, "--source", "B615+862=1477E",
                        "--metric", "logit", "--json"])
    assert rc == 0, err
    assert json.loads(out)["n"] == 1


@pytest.mark.parametrize("extra,message", [
    (["--contrasts", "Q"], r"valid contrasts are R \(random\) and F"),
    (["--n", "0"], r"--n must be in \[1, 100000\]"),
    (["--n", "1000000000"], r"--n must be in \[1, 100000\]"),
    (["--out", "{f}"], r"is an existing file"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_patch_table_options(count_model, a_dir, a_file, extra, message):
    args = {"--out": str(a_dir / "table"), **dict(zip(extra[::2], extra[1::2]))}
    refused(["patch-table", count_model, *[x.format(f=a_file) for kv in args.items() for x in kv]], message)


def test_patch_table_needs_a_counting_model(add_model, a_dir):
    refused(["patch-table", add_model, "--n", "2", "--out", a_dir / "t"], r"needs a counting model")


# ---- decoder train / eval, invert ---------------------------------------------------------------
def damaged_decoder(src: Path, dst: Path, how: str) -> Path:
    d = bad_files.copy_dir(src, dst)
    weights = sorted(p for p in d.iterdir() if p.suffix in (".pt", ".safetensors"))
    assert weights, list(d.iterdir())
    actions = {
        "truncated": lambda: [bad_files.truncate(w) for w in weights],
        "garbage": lambda: ([bad_files.garbage(w) for w in weights], bad_files.drop_checksums(d)),
        "garbage_checksummed": lambda: [bad_files.garbage(w) for w in weights],
        "truncated_no_checksum": lambda: ([bad_files.truncate(w) for w in weights], bad_files.drop_checksums(d)),
        "empty": lambda: [w.write_bytes(b"") for w in weights],
        "scrambled": lambda: [bad_files.scramble_tail(w, 200) for w in weights],
        "meta_non_utf8": lambda: bad_files.non_utf8(d / "decoder.json"),
        "meta_not_json": lambda: (d / "decoder.json").write_text("{oops"),
    }
    actions[how]()
    return d


DECODER_DAMAGE = [
    ("truncated", r"(truncated|corrupt)"),
    ("garbage", r"(corrupt|not a)"),
    ("garbage_checksummed", r"truncated or was replaced"),
    ("truncated_no_checksum", r"(truncated|corrupt)"),
    ("empty", r"(empty|truncated|corrupt)"),
    ("scrambled", r"(sha256|CRC|corrupt)"),
    ("meta_non_utf8", r"decoder\.json' is not UTF-8"),
    ("meta_not_json", r"decoder\.json.*corrupt"),
]


@pytest.mark.parametrize("how,message", DECODER_DAMAGE, ids=[d[0] for d in DECODER_DAMAGE])
def test_invert_refuses_damaged_decoder(decoder, work, how, message):
    d = damaged_decoder(decoder, work / f"dec_{how}", how)
    refused(["invert", d, "--site", "a1.0@=", "--input", GOOD_SUM, "--per-cell", "1"], message)


def test_decoder_eval_refuses_truncated_decoder(decoder, work):
    d = damaged_decoder(decoder, work / "dec_eval_truncated", "truncated")
    refused(["decoder", "eval", d, "--queries", "1", "--per-cell", "1"], r"(truncated|corrupt)")


@pytest.mark.parametrize("extra,message", [
    (["--input", ""], r"--input is empty; expected B, a 100-999"),
    (["--input", "   "], r"--input is empty"),
    (["--input", "B615+861=1476"], r"not a valid addition input"),
    (["--input", "B615+861=1476E123"], r"more than the task's 14"),
    (["--input", "hello"], r"characters 'ehlo' are not in the vocabulary"),
    (["--input", "B615+861=1466E"], r"answer '1466' is not 615\+861 = 1476"),
    (["--input", GOOD_SUM, "--eps", "-1"], r"--eps must be > 0"),
    (["--input", GOOD_SUM, "--eps", "nan"], r"--eps must be a finite number"),
    (["--input", GOOD_SUM, "--per-cell", "0"], r"--per-cell must be in \[1, 16384\]"),
    (["--input", GOOD_SUM, "--per-cell", "1000000000"], r"--per-cell must be in \[1, 16384\]"),
    (["--input", GOOD_SUM, "--show", "0"], r"--show must be > 0"),
    (["--input", GOOD_SUM, "--threads", "0"], r"--threads must be >= 1"),
    (["--input", GOOD_SUM, "--html", "{d}"], r"--html .* is an existing directory"),
    (["--input", GOOD_SUM, "--device", "zz"], r"invalid choice"),
], ids=lambda v: "_".join(v)[:50] if isinstance(v, list) else None)
def test_invert_options(decoder, a_dir, extra, message):
    refused(["invert", decoder, "--site", "a1.0@=", *[a.format(d=a_dir) for a in extra]], message)


@pytest.mark.parametrize("site,message", [
    ("a1.0", r"needs a position"),
    ("m0@=", r"not trained on site"),
    ("zz@=", r"cannot parse site"),
    ("a1.0@ZZ", r"unknown position 'ZZ'"),
    ("a1.0@99", r"out of range"),
])
def test_invert_sites(decoder, site, message):
    refused(["invert", decoder, "--site", site, "--input", GOOD_SUM, "--per-cell", "1"], message)


def test_invert_good_input_gives_samples(decoder):
    rc, out, err = cli(["invert", decoder, "--site", "a1.0@=", "--input", GOOD_SUM, "--per-cell", "1", "--json"])
    assert rc == 0, err
    assert json.loads(out)["n_samples"] == 4


@pytest.mark.parametrize("extra,message", [
    (["--eps", "-1"], r"--eps must be > 0"),
    (["--queries", "0"], r"--queries must be in \[1, 100000\]"),
    (["--per-cell", "1000000000"], r"--per-cell must be in"),
    (["--threads", "0"], r"--threads must be >= 1"),
    (["--sites", "zz"], r"cannot parse site"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_decoder_eval_options(decoder, extra, message):
    refused(["decoder", "eval", decoder, "--queries", "1", "--per-cell", "1", *extra], message)


@pytest.mark.parametrize("extra,message", [
    (["--out", "{f}"], r"is an existing file"),
    (["--out", "{new}", "--steps", "0"], r"--steps must be > 0"),
    (["--out", "{new}", "--minutes", "-1"], r"--minutes must be > 0"),
    (["--out", "{new}", "--final-eval-queries", "-1"], r"--final-eval-queries must be >= 0"),
    (["--out", "{new}", "--sites", "zz"], r"cannot parse site"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_decoder_train_options(add_model, a_file, work, extra, message):
    args = [a.format(f=a_file, new=work / "no_decoder") for a in extra]
    refused(["decoder", "train", add_model, "--quiet", "--steps", "1", *args], message)


# ---- hypothesize, verify, circuit ---------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--eps", "-1"], r"--eps must be > 0"),
    (["--fdr", "0"], r"--fdr must be in \(0, 1\]"),
    (["--fdr", "2"], r"--fdr must be in \(0, 1\]"),
    (["--min-kappa", "5"], r"--min-kappa must be in \[-1, 1\]"),
    (["--top", "-1"], r"--top must be >= 0"),
    (["--threads", "-3"], r"--threads must be >= 1"),
    (["--queries", "0"], r"--queries must be > 0"),
    (["--out", "{d}"], r"is an existing directory"),
    (["--source", "decoder"], r"--source decoder needs --decoder"),
    (["--sites", "a1.0", "--positions", "ZZ"], r"unknown position 'ZZ'"),
    (["--sites", "a7.0@="], r"layer 7 does not exist"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_hypothesize_options(add_model, a_dir, extra, message):
    base = ["hypothesize", add_model, "--sites", "a1.0@=", "--queries", "2", "--pool", "50"]
    refused(base + [a.format(d=a_dir) for a in extra], message)


def test_hypothesize_refuses_truncated_decoder(add_model, decoder, work):
    d = damaged_decoder(decoder, work / "dec_hyp_truncated", "truncated")
    refused(["hypothesize", add_model, "--sites", "a1.0@=", "--source", "decoder", "--decoder", d], r"(truncated|corrupt)")


@pytest.mark.parametrize("extra,message", [
    (["--claim", "a1.0@=", "zz"], r"unknown feature 'zz'"),
    (["--claim", "a1.0", "A1"], r"needs a position"),
    (["--hypotheses", "{f}"], r"(not a hypothesis report|cannot read hypothesis report)"),
    (["--hypotheses", "{nonutf8}"], r"hypothesis report .* is not UTF-8"),
    (["--hypotheses", "{f}/nope.json"], r"does not exist"),
    (["--claim", "a1.0@=", "A1", "--min-iia", "2"], r"--min-iia must be in \[0, 1\] \(a rate\)"),
    (["--claim", "a1.0@=", "A1", "--pairs", "0"], r"--pairs must be in \[1, 100000\]"),
    (["--claim", "a1.0@=", "A1", "--inputs", "100000000"], r"--inputs must be in \[4, 200000\]"),
    (["--claim", "a1.0@=", "A1", "--threads", "0"], r"--threads must be >= 1"),
    (["--claim", "a1.0@=", "A1", "--max-group", "-1"], r"--max-group must be in \[0, 64\]"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_verify_options(add_model, a_file, work, extra, message):
    nonutf8 = work / "hyp_non_utf8.json"
    bad_files.non_utf8(nonutf8)
    refused(["verify", add_model, "--inputs", "100", "--pairs", "10", "--no-controls",
             *[a.format(f=a_file, nonutf8=nonutf8) for a in extra]], message)


def test_verify_out_on_a_directory(add_model, a_dir):
    refused(["verify", add_model, "--claim", "a1.0@=", "A1", "--inputs", "100", "--pairs", "10", "--no-controls",
             "--max-group", "0", "--out", a_dir], r"is an existing directory")


@pytest.mark.parametrize("extra,message", [
    (["--verified", "{f}"], r"(not a verification report|cannot read verification report)"),
    (["--target", "2"], r"--target must be in \(0, 1\] \(a normalised faithfulness\)"),
    (["--inputs", "3"], r"--inputs must be in \[10, 200000\]"),
    (["--min-edge", "-5"], r"--min-edge must be in \[0, 1\]"),
    (["--edge-pairs", "0"], r"--edge-pairs must be in \[1, 100000\]"),
    (["--queries", "0"], r"--queries must be in \[1, 10000\]"),
    (["--pool", "0"], r"--pool must be in \[1, 1000000\]"),
    (["--threads", "0"], r"--threads must be >= 1"),
    (["--out", "{f}"], r"is an existing file"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_circuit_options(add_model, a_file, a_dir, extra, message):
    out = [] if "--out" in extra else ["--out", a_dir / "c"]
    refused(["circuit", add_model, *out, *[a.format(f=a_file) for a in extra]], message)


# ---- run: case tomls ----------------------------------------------------------------------------
def toml_case(tmp_path: Path, body: str, name: str = "case.toml") -> Path:
    f = tmp_path / name
    f.write_text('name = "bad"\ntask = "addition"\n' + body)
    return f


@pytest.mark.parametrize("body,message", [
    ('model = "oops"\n', r"\[model\] must be a table"),
    ('[decoder]\nminutes = "abc"\n', r"\[decoder\] minutes: expected a number, got 'abc'"),
    ('[decoder]\nsteps = true\n', r"\[decoder\] steps: expected an integer"),
    ('[decoder]\nsteps = 1.5\n', r"\[decoder\] steps: expected an integer"),
    ('[decoder]\nminutes = -1\n', r"\[decoder\] minutes must be > 0"),
    ('[decoder]\nminutes = nan\n', r"minutes: expected a finite number"),
    ('[decoder]\nquick_minutes = "x"\n', r"\[decoder\] quick_minutes: expected a number"),
    ('[decoder]\nquick_steps = -1\n', r"\(with --quick\) \[decoder\] steps must be >= 0"),
    ('[decoder]\nsites = ["zz"]\n', r"\[decoder\] sites: cannot parse site 'zz'"),
    ('[decoder]\nsites = "a0.0"\n', r"\[decoder\] sites: expected a list"),
    ('[decoder]\nminuts = 3\n', r"unknown key 'minuts'"),
    ('[decoder]\nlr = -0.001\n', r"\[decoder\] lr must be >= 0"),
    ('[decoder]\ncompile = "yes"\n', r"\[decoder\] compile: expected true or false"),
    ('[circuit]\nstructural = "yes"\n', r"\[circuit\] structural: expected true or false"),
    ('[decoder]\nrebalance_window = -1\n', r"\[decoder\] rebalance_window must be"),
    ('[decoder]\nrebalance_per_cell = 2.5\n', r"\[decoder\] rebalance_per_cell"),
    ('seed = -1\n', r"seed must be in \[0, 4294967295\]"),
    ('bogus = 1\n', r"top level: unknown key 'bogus'"),
    ('[hypotheses]\nscreen_threshold = 2\n', r"screen_threshold must be in \[0, 1\]"),
    ('[hypotheses]\npositions = ["ZZ"]\n', r"unknown position 'ZZ'"),
    ('[hypotheses]\nsource = "oracle"\n', r"source must be 'decoder' or 'pool'"),
    ('[circuit]\ntarget = 0\n', r"target must be in \(0, 1\]"),
    ('[patching]\ncontrasts = ["R"]\n', r"contrasts: unknown \['R'\]"),
    ('[patching]\ntarget = "A9"\n', r"unknown target 'A9'"),
    ('[patching]\ngroups = [["a0.0@ZZ"]]\n', r"unknown position 'ZZ'"),
    ('[comparison]\nmethods = ["eap", "acdcx"]\n', r"\[comparison\] methods: unknown \['acdcx'\]; valid: eap, "),
    ('[comparison]\nmethods = ["eap", "eap"]\n', r"\[comparison\] methods: each method once"),
    ('[comparison]\nablation = "noise"\n', r"\[comparison\] ablation must be one of resample, mean, zero"),
    ('[comparison]\nsources = "shuffled"\n', r"\[comparison\] sources must be one of same-layout, any-layout"),
    ('[comparison]\nn = 3\n', r"\[comparison\] n must be in \[10, 100000\]"),
    ('[inversion]\nqueries = ["a0.0@=|B61+861=922E"]\n', r"the text 'B61\+861=922E' is not a valid addition input"),
    ('[inversion]\nqueries = ["a0.0|B615+861=1476E"]\n', r"needs a position"),
    ('[inversion]\nqueries = ["B615+861=1476E"]\n', r"entries look like 'SITE@POS\|TEXT'"),
    ('[[paper_claims]]\nclaim = "x"\nkind = "maybe"\n', r"kind must be one of verified, finding, circuit"),
    ('[[paper_claims]]\nclaim = "x"\nkind = "circuit"\n', r"needs path"),
    ('[model]\nsource = "path"\npath = "nowhere/at/all"\n', r"\[model\] path 'nowhere/at/all' is not a checkpoint"),
    ('[decoder]\npath = "nowhere/at/all"\n', r"decoder directory .* does not exist"),
], ids=lambda v: re.sub(r"\W+", "_", v)[:40] if isinstance(v, str) and "\n" in v else None)
def test_run_refuses_bad_toml(tmp_path, body, message):
    refused(["run", toml_case(tmp_path, body), "--work", tmp_path / "w", "--out", tmp_path / "o"], message)
    assert not (tmp_path / "w").exists(), "a stage ran before the config was checked"


def test_run_reports_every_config_error_at_once(tmp_path):
    body = 'model = "oops"\n[decoder]\nminutes = "abc"\n[circuit]\ntarget = 5\n[patching]\nexamples = -1\n'
    err = refused(["run", toml_case(tmp_path, body), "--work", tmp_path / "w"], r"4 problems")
    for key in ("[model]", "minutes", "target", "examples"):
        assert key in err
    assert err.count("\n") == 1, "one line"


def test_run_refuses_non_utf8_toml(tmp_path):
    f = tmp_path / "latin.toml"
    f.write_bytes('name = "caf\u00e9"\ntask = "addition"\n'.encode("latin-1"))
    refused(["run", f, "--work", tmp_path / "w"], r"is not UTF-8 text \(byte 0xe9")


def test_run_refuses_truncated_decoder_before_any_stage(decoder, tmp_path):
    d = damaged_decoder(decoder, tmp_path / "dec", "truncated")
    refused(["run", "addition", "--quick", "--decoder", d, "--work", tmp_path / "w"], r"(truncated|corrupt)")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("extra,message", [
    (["--device", "zz"], r"unknown --device 'zz'"),
    (["--threads", "0"], r"--threads must be >= 1"),
    (["--out", "{f}"], r"--out .* is an existing file"),
    (["--work", "{f}"], r"--work .* is an existing file"),
    (["--model", "{f}"], r"not a checkpoint directory"),
], ids=lambda v: "_".join(v)[:30] if isinstance(v, list) else None)
def test_run_options(a_file, tmp_path, extra, message):
    args = {"--work": str(tmp_path / "w"), **dict(zip(extra[::2], extra[1::2]))}
    refused(["run", "addition", "--quick", *[x.format(f=a_file) for kv in args.items() for x in kv]], message)


# ---- property-based: site strings, task inputs, TOML values -------------------------------------
SITE_ALPHABET = "axmqkvzpatenrsoidbl.0123456789@:=_[]-AFS"


@FAST
@given(st.text(alphabet=SITE_ALPHABET, max_size=24))
def test_property_site_strings_parse_or_refuse(text):
    """Any string is a site (that prints back to a site that parses the same) or a CircuitkitError."""
    try:
        site = parse_site(text)
    except CircuitkitError as e:
        assert str(e)
        return
    assert parse_site(str(site)) == site


@settings(max_examples=8, deadline=DEADLINE_MS, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.text(alphabet=SITE_ALPHABET, min_size=1, max_size=16))
def test_property_patch_site_strings(add_model, text):
    """``patch --site`` with a generated string: a result for a real site of this model, else one error line."""
    rc, out, err = cli(["patch", add_model, "--site", text, "--n", "2", "--ablation", "zero", "--metric", "logit",
                        "--json"])
    assert "Traceback" not in err
    if rc == 0:
        site = parse_site(text)
        assert site.layer is None or site.layer < 2
        assert json.loads(out)["n"] == 2
    else:
        assert rc == 2 and err.startswith("circuitkit: error: ")


def _addition_oracle(text: str) -> bool:
    """Independent statement of the addition format: B a + b = a+b E, a and b in 100..999."""
    m = re.fullmatch(r"B([1-9]\d\d)\+([1-9]\d\d)=(\d+)E", text.rstrip("P"))
    return len(text) <= 14 and bool(m) and int(m.group(3)) == int(m.group(1)) + int(m.group(2)) and not m.group(3).startswith("0")


def _counting_oracle(text: str) -> bool:
    m = re.fullmatch(r"B([a-z]+)\|([a-z]):(\d)E", text.rstrip("P"))
    if not m or len(text) > 33:
        return False
    body, q, c = m.groups()
    counts = {ch: body.count(ch) for ch in set(body)}
    return len(counts) == 3 and all(1 <= v <= 9 for v in counts.values()) and counts.get(q) == int(c)


def _mutations(valid: str, alphabet: str) -> st.SearchStrategy[str]:
    """A valid input with one character replaced, inserted or deleted, or cut short."""
    i = st.integers(0, len(valid) - 1)
    ch = st.sampled_from(alphabet)
    return st.one_of(
        st.builds(lambda k, c: valid[:k] + c + valid[k + 1:], i, ch),
        st.builds(lambda k, c: valid[:k] + c + valid[k:], i, ch),
        st.builds(lambda k: valid[:k] + valid[k + 1:], i),
        st.builds(lambda k: valid[:k], i),
    )


@settings(max_examples=150, deadline=DEADLINE_MS, derandomize=True)
@given(st.one_of(_mutations(GOOD_SUM, "0123456789B+=EPx"), st.text(alphabet="0123456789B+=EP", max_size=16)))
def test_property_addition_inputs(text):
    """check_input accepts exactly what the independent oracle calls an addition input."""
    task = get_task("addition")
    try:
        task.check_input(text)
        accepted = True
    except CircuitkitError as e:
        assert "addition" in str(e) or "vocabulary" in str(e) or "empty" in str(e)
        accepted = False
    assert accepted == _addition_oracle(text), text


@settings(max_examples=150, deadline=DEADLINE_MS, derandomize=True)
@given(_mutations("Bvvzccvczvvvzvcvc|v:8E", "abcvz|:123456789BEP"))
def test_property_counting_inputs(text):
    task = get_task("counting")
    try:
        task.check_input(text)
        accepted = True
    except CircuitkitError:
        accepted = False
    assert accepted == _counting_oracle(text), text


@settings(max_examples=60, deadline=DEADLINE_MS, derandomize=True)
@given(st.lists(st.sampled_from(["<bos>", "<eos>", "Then", ",", ".", "Mary", "John", "Alice", "went", "to", "the",
                                 "store", "gave", "a", "drink", "and"]), max_size=20))
def test_property_ioi_inputs(words):
    """IOI word sequences: accepted ones are templates whose final name the task reads as the answer."""
    task = get_task("ioi")
    text = " ".join(words)
    try:
        task.check_input(text)
    except CircuitkitError:
        return
    toks = task.tokens(text)
    target = task.target(toks)
    assert target.wrong is not None and target.token != target.wrong


@FAST
@given(_mutations(GOOD_SUM, "0123456789B+=EPx"))
def test_property_invert_inputs(decoder, text):
    """``invert --input`` on generated text: samples for a valid input, one clean error line otherwise."""
    rc, out, err = cli(["invert", decoder, "--site", "x0.pre@F1", "--input", text, "--per-cell", "1", "--show", "2",
                        "--json"])
    assert "Traceback" not in err
    assert (rc == 0) == _addition_oracle(text), (text, err)
    if rc == 0:
        assert json.loads(out)["n_samples"] == 4
    else:
        assert err.startswith("circuitkit: error: ") and err.count("\n") == 1


def _toml_value(v: object) -> str:
    """A TOML literal for a generated value (TOML spells inf and nan in lower case)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


TOML_VALUES = st.one_of(
    st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(alphabet="abc@:=01 ", max_size=8), st.lists(st.integers(-3, 3), max_size=3),
    st.lists(st.text(alphabet="am0.1@=", max_size=6), max_size=3),
)
TOML_KEYS = [("decoder", "minutes"), ("decoder", "steps"), ("decoder", "n_per_cell"), ("decoder", "sites"),
             ("decoder", "lr"), ("decoder", "rebalance_window"),
             ("hypotheses", "screen_threshold"), ("hypotheses", "pairs"), ("hypotheses", "source"),
             ("hypotheses", "positions"), ("circuit", "target"), ("circuit", "edge_pairs"),
             ("patching", "examples"), ("patching", "contrasts"), ("model", "lr"), ("model", "source"),
             ("inversion", "queries"), ("", "seed")]


@settings(max_examples=120, deadline=DEADLINE_MS, derandomize=True)
@given(st.sampled_from(TOML_KEYS), TOML_VALUES, st.booleans())
def test_property_toml_values(tmp_path_factory, key, value, quick):
    """A generated value for a case key: loaded with the declared type and a value in range, or refused
    with a message naming the key; never a traceback, never a mistyped config."""
    section, name = key
    head = 'name = "p"\ntask = "addition"\n'
    line = f"{'quick_' if quick else ''}{name} = {_toml_value(value)}\n"
    body = head + (line if not section else f"[{section}]\n{line}")
    f = tmp_path_factory.mktemp("toml") / "p.toml"
    f.write_text(body)
    try:
        cfg = load_case(str(f), quick=quick)
    except CircuitkitError as e:
        assert name in str(e), (body, str(e))
        return
    obj = getattr(cfg, section) if section else cfg
    got, hint = getattr(obj, name), get_type_hints(type(obj))[name]
    assert got == value
    if hint is float:
        assert isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got) and got >= 0
    elif hint is int:
        assert isinstance(got, int) and not isinstance(got, bool) and got >= 0
    else:
        assert isinstance(got, get_origin(hint) or hint)


@settings(max_examples=25, deadline=DEADLINE_MS, derandomize=True)
@given(st.lists(st.sampled_from(TOML_KEYS[:10]), min_size=2, max_size=4, unique=True))
def test_property_every_toml_error_reported(tmp_path_factory, keys):
    """Several mistyped keys at once: every one of them is named in the single message."""
    by_section: dict[str, list[str]] = {}
    for section, name in keys:
        by_section.setdefault(section, []).append(f'{name} = {{bad = 1}}')
    body = 'name = "p"\ntask = "addition"\n' + "".join(
        f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in by_section.items())
    f = tmp_path_factory.mktemp("toml") / "multi.toml"
    f.write_text(body)
    with pytest.raises(CircuitkitError) as e:
        load_case(str(f))
    for _, name in keys:
        assert f"{name}: expected" in str(e.value), (body, str(e.value))


# ---- the real exit path (subprocess) ------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["patch", str(MODELS / "addition"), "--site", "a1.0@=", "--n", "1000000000"], "--n must be in"),
    (["run", "addition", "--device", "zz"], "unknown --device 'zz'"),
    (["invert", "/nonexistent/decoder", "--site", "a1.0@=", "--input", ""], "does not exist"),
], ids=["patch_n", "run_device", "invert_missing"])
def test_console_exit_status(argv, message, tmp_path):
    p = subprocess.run([sys.executable, "-m", "circuitkit.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr
