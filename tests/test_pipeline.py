"""`circuitkit run CASE --quick` end to end: every stage, the report, caching and resume.  The addition run
is made by circuitkit installed from a wheel in a fresh environment outside the checkout (case configs and
probed models are package data); the kill-and-resume test reruns it from the checkout, byte for byte."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from circuitkit.cli import main
from circuitkit.pipeline.config import load_case
from tests.browser import visit


def _installed(bin_dir, argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(bin_dir / "circuitkit"), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, installed_wheel):
    root = tmp_path_factory.mktemp("run")
    argv = ["run", "addition", "--quick", "--work", str(root / "work"), "--out", str(root / "report"), "--quiet",
            "--json", "--threads", "2"]
    where = subprocess.run([str(installed_wheel / "python"), "-c", "import circuitkit; print(circuitkit.__file__)"],
                           cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed_wheel.parent)), where  # the wheel's copy, not the checkout
    proc = _installed(installed_wheel, argv, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, argv


def test_quick_run_writes_a_complete_report(quick_run):
    root, _ = quick_run
    rep = root / "report"
    for f in ("index.html", "report.md", "manifest.json", "results.json", "circuit.json", "circuit.graphml",
              "circuit.dot", "circuit.svg"):
        assert (rep / f).exists(), f
    md = (rep / "report.md").read_text()
    for section in ("## Probed model", "## InversionView decoder", "## InversionView panels", "## Activation patching",
                    "## Cumulative group patching", "## Hypotheses, verification and the circuit",
                    "## Side by side with automatic circuit discovery",
                    "## The paper's claims beside circuitkit's verification", "## Reproducibility manifest"):
        assert section in md, section
    man = json.loads((rep / "manifest.json").read_text())
    assert man["seed"] == 0 and man["config"]["quick"] is True and man["versions"]["torch"].startswith("2.13")
    # --threads 2 overrides the choice for every stage, and the manifest says so
    assert {v["threads"] for v in man["threads_by_stage"].values()} == {2}
    assert {v["reason"] for v in man["threads_by_stage"].values()} == {"--threads"}
    res = json.loads((rep / "results.json").read_text())
    assert set(res["claims"]) == {c["claim"] for c in load_case("addition", quick=True).paper_claims}
    for fig in ("decoder_curve.png", "circuit.png", "faithfulness_curve.png", "screen.png", "comparison_curve.png"):
        assert (rep / "figures" / fig).read_bytes()[:4] == b"\x89PNG", fig  # present, and a PNG


def test_the_comparison_stage_is_discover_then_compare(quick_run, tmp_path, capsys):
    """results.json's ``comparison`` (every default method beside circuitkit's circuit, judged on the next seed's
    pairs) equals what ``circuitkit compare`` gives for the circuit files the report carries, and its verdict is
    the comparison of circuitkit's faithfulness with the best method's at the same edge count."""
    root, _ = quick_run
    rep = root / "report"
    res = json.loads((rep / "results.json").read_text())["comparison"]
    cfg = load_case("addition", quick=True)
    assert {r["method"] for r in res["rows"]} == set(cfg.comparison.methods) | {"circuitkit", "circuitkit+bundles"}
    assert res["inputs"]["scored_on"]["seed"] == cfg.seed and res["inputs"]["judged_on"]["seed"] == cfg.seed + 1
    assert res["inputs"]["judged_on"]["n"] == cfg.comparison.n == 40
    model = str(cfg.resolve(cfg.model.path))
    argv = ["compare", model, str(rep / "comparison" / "circuits"), str(rep / "circuit.json"), "--n", "40", "--seed",
            str(cfg.seed + 1), "--out", str(tmp_path / "cmp"), "--json"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    ours = {r["method"]: r["faithfulness"] for r in res["rows"]}
    assert set(ours) == {r["method"] for r in again["rows"]}
    for r in again["rows"]:  # the same inputs and circuits; thread counts may round the last digits apart
        assert r["faithfulness"] == pytest.approx(ours[r["method"]], abs=2e-3), r["method"]
    v = res["verdict"]
    rivals = [r["faithfulness_at_circuitkit_size"] for r in res["rows"] if "faithfulness_at_circuitkit_size" in r]
    assert v["best_faithfulness"] == max(rivals) and len(rivals) == len(cfg.comparison.methods)
    assert v["whole_graph"] == (v["circuitkit_edges"] == res["n_edges_total"])
    assert abs(1 - v["closest_faithfulness"]) == min(abs(1 - f) for f in rivals)
    if not v["whole_graph"]:
        assert v["at_least_best"] == (v["circuitkit_faithfulness"] >= v["best_faithfulness"])
        assert v["at_least_as_close"] == (abs(1 - v["circuitkit_faithfulness"]) <= abs(1 - v["closest_faithfulness"]))
    said = ("keeps every edge of the graph" if v["whole_graph"] else
            "at least as faithful as" if v["at_least_best"] else "less faithful than")
    assert said in (rep / "report.md").read_text()


def test_rerun_reuses_every_stage(quick_run, installed_wheel):
    root, argv = quick_run
    before = json.loads((root / "report" / "results.json").read_text())
    proc = _installed(installed_wheel, argv, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out["cached"]) == set(out["stages"]), out  # every stage reused
    assert json.loads((root / "report" / "results.json").read_text()) == before


def test_quick_report_opens_cleanly_in_chromium(quick_run, tmp_path):
    root, _ = quick_run
    v = visit(root / "report" / "index.html", tmp_path / "report.png")
    assert v.console_errors == [] and v.network_requests == []


def test_a_killed_run_resumes_to_the_same_circuit(quick_run, tmp_path):
    """SIGKILL in the decoder stage (after its first checkpoint), then the same command: training resumes where
    it stopped, what the killed run left is cleaned up, and circuit.json is byte-identical to the uninterrupted
    run's, made in other processes with other hash seeds (same seed, same machine: the same circuit)."""
    root, _ = quick_run
    work, out = tmp_path / "work", tmp_path / "report"
    cmd = [sys.executable, "-m", "circuitkit.cli", "run", "addition", "--quick", "--work", str(work), "--out",
           str(out), "--threads", "2"]
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    proc = subprocess.Popen(cmd + ["--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(work.glob(".decoder-*.partial/train_state.pt")):
        assert proc.poll() is None, "the run ended before the decoder checkpointed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(work.glob(".decoder.*.tmp")) and not (work / "decoder").exists()  # killed mid-stage
    rerun = subprocess.run(cmd, env={**env, "PYTHONHASHSEED": "2"}, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = rerun.stdout + rerun.stderr
    assert "resumed an interrupted training from step" in log and "removed 1 temporary item" in log
    assert not list(work.glob(".decoder*.tmp")) and not list(work.glob(".decoder-*.partial"))
    assert (out / "circuit.json").read_bytes() == (root / "report" / "circuit.json").read_bytes()


def test_run_bad_case_exits_2(capsys):
    assert main(["run", "nonexistent"]) == 2
    assert "available:" in capsys.readouterr().err


def test_run_with_a_decoder_trained_elsewhere(quick_run, tmp_path, capsys):
    """--decoder DIR uses that decoder as is (no retraining), evaluates it and says so in the report."""
    root, _ = quick_run
    shutil.copytree(root / "work", tmp_path / "work")
    decoder = root / "work" / "decoder" / "decoder"
    argv = ["run", "addition", "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report"),
            "--quiet", "--json", "--threads", "2", "--decoder", str(decoder)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert "decoder" not in out["cached"] and "model" in out["cached"]
    res = json.loads((tmp_path / "report" / "results.json").read_text())
    assert res["decoder"]["source"] == str(decoder) and res["decoder"]["eval"]["sites"]
    assert "not retrained" in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "work" / "decoder" / "decoder").exists()  # nothing was trained


def test_run_rejects_a_decoder_for_another_model(tiny_counting_model, tmp_path, capsys):
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder

    other = tmp_path / "counting_decoder"
    train_decoder(tiny_counting_model, other, DecoderTrainConfig(steps=2, d_model=16, cond_mid=32, batch_size=8,
                                                                 final_eval_queries=0), progress=False)
    argv = ["run", "addition", "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report"),
            "--quiet", "--decoder", str(other)]
    assert main(argv) == 2
    assert "different probed model" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("case", ["counting", "ioi"])
def test_quick_run_regenerates_the_other_case_studies(case, tmp_path):
    """The counting and ioi quick reports regenerate end to end from the committed code and models."""
    argv = ["run", case, "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report"), "--quiet",
            "--json", "--threads", "2"]
    assert main(argv) == 0
    rep = tmp_path / "report"
    md = (rep / "report.md").read_text()
    for section in ("## Probed model", "## InversionView panels", "## Hypotheses, verification and the circuit",
                    "## The paper's claims beside circuitkit's verification", "## Reproducibility manifest"):
        assert section in md, section
    res = json.loads((rep / "results.json").read_text())
    assert set(res["claims"]) == {c["claim"] for c in load_case(case, quick=True).paper_claims}
    man = json.loads((rep / "manifest.json").read_text())
    assert man["config"]["quick"] is True and man["config"]["task"] == case
    # the mechanisms: every claim of the case holds on the committed model, and the circuit is faithful
    assert all(v.startswith("holds") for v in res["claims"].values()), res["claims"]
    circ = res["circuit"]
    assert circ["evaluation"]["faithfulness_normalized"]["all"] >= 0.9
    assert circ["summary"]["controls"]["shuffled_feature"]["verified"] == 0
    assert circ["summary"]["controls"]["proxy"]["verified"] == 0
    nodes = json.loads((rep / "circuit.json").read_text())["nodes"]
    if case == "counting":
        iia = {n["id"]: n["iia"] for n in nodes if "count(query)" in n.get("features", [])}
        assert iia.get("a0.0@Q", 0) >= 0.9 and iia.get("a1.0@:", 0) >= 0.9, iia
    else:  # the layer-1 heads at END carry IO under IO/S swaps, as a group
        movers = [n for n in nodes if "IO" in n.get("features", []) and n["id"].startswith("a1.")]
        assert movers and all(n["iia"] >= 0.9 and n["id"].endswith("@END") for n in movers), movers
