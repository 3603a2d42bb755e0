"""`circuitkit run CASE --quick` end to end: every stage, the report, caching and resume."""
from __future__ import annotations

import json

import pytest

from circuitkit.cli import main
from circuitkit.pipeline.config import load_case

from tests.browser import visit


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    argv = ["run", "addition", "--quick", "--work", str(root / "work"), "--out", str(root / "report"), "--quiet",
            "--json", "--threads", "2"]
    assert main(argv) == 0
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
                    "## The paper's claims beside circuitkit's verification", "## Reproducibility manifest"):
        assert section in md, section
    man = json.loads((rep / "manifest.json").read_text())
    assert man["seed"] == 0 and man["config"]["quick"] is True and man["versions"]["torch"].startswith("2.13")
    res = json.loads((rep / "results.json").read_text())
    assert set(res["claims"]) == {c["claim"] for c in load_case("addition", quick=True).paper_claims}
    assert all(not (rep / "figures" / p).exists() or (rep / "figures" / p).read_bytes()[:4] == b"\x89PNG"
               for p in ("decoder_curve.png", "circuit.png"))


def test_rerun_reuses_every_stage(quick_run, capsys):
    root, argv = quick_run
    before = json.loads((root / "report" / "results.json").read_text())
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["cached"]) == set(out["stages"]), out  # every stage reused
    assert json.loads((root / "report" / "results.json").read_text()) == before


def test_quick_report_opens_cleanly_in_chromium(quick_run, tmp_path):
    root, _ = quick_run
    v = visit(root / "report" / "index.html", tmp_path / "report.png")
    assert v.console_errors == [] and v.network_requests == []


def test_run_bad_case_exits_2(capsys):
    assert main(["run", "nonexistent"]) == 2
    assert "available:" in capsys.readouterr().err
