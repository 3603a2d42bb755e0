"""tracr-compiled programs as native models with their ground truth (``circuitkit model from-tracr``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tracr", reason="tracr ground truth needs the extra: pip install 'circuitkit[tracr]'")

from circuitkit.cli import main  # noqa: E402
from circuitkit.errors import CircuitkitError  # noqa: E402
from circuitkit.models.checkpoint import read_architecture  # noqa: E402
from circuitkit.models.from_tracr import from_tracr  # noqa: E402
from circuitkit.models.native import load_native  # noqa: E402
from circuitkit.models.runner import ModelRunner  # noqa: E402

PROGRAMS = Path(__file__).resolve().parents[1] / "case_studies" / "programs" / "tracr_programs.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tracr")
    for name in ("reverse", "frac_prevs"):
        from_tracr(f"{PROGRAMS}:{name}", root / name, log=lambda m: None)
    return {name: root / name for name in ("reverse", "frac_prevs")}


@pytest.mark.parametrize(("name", "n_inputs"), [("reverse", 3 + 9 + 27 + 81 + 243), ("frac_prevs", 4 + 16 + 64 + 256 + 1024)])
def test_converted_models_equal_tracr_on_every_input(converted, name, n_inputs):
    check = json.loads((converted[name] / "tracr.json").read_text())["check"]
    assert check["exhaustive"] and check["inputs_checked"] == n_inputs and check["mismatches"] == 0


def _truth(d: Path) -> dict:
    return json.loads((d / "ground_truth.json").read_text())


def test_ground_truth_names_what_each_component_computes(converted):
    """reverse: the length sub-circuit (a0.0, m0), opp_idx (m1, m2), the reversing head a3.0 (ACDC's tracr-reverse);
    frac_prevs: the `tokens == x` map at m0, the averaging head a1.0."""
    rev = _truth(converted["reverse"])
    comps, var = rev["components"], lambda c: {v.split("_")[0] for v in c["writes"]}  # noqa: E731
    assert set(comps) == {"a0.0", "m0", "m1", "m2", "a3.0"}
    assert var(comps["a3.0"]) == {"reverse"} and "opp" in var(comps["m2"]) and "length" in var(comps["m0"])
    pairs = {(e["sender"], e["receiver"]) for e in rev["edges"]}
    assert {("a0.0", "m0"), ("m0", "m1"), ("m1", "m2"), ("m2", "a3.0"), ("a3.0", "out")} <= pairs
    assert ("a0.0", "a3.0") not in pairs  # the length reaches the head only through opp_idx
    frac = _truth(converted["frac_prevs"])
    assert set(frac["components"]) == {"m0", "a1.0"}
    assert {(e["sender"], e["receiver"]) for e in frac["edges"]} >= {("m0", "a1.0"), ("a1.0", "out")}
    assert frac["components"]["a1.0"]["writes"] == [frac["output_variable"]]
    assert frac["components"]["m0"]["writes"][0] in frac["components"]["a1.0"]["reads_by_input"]["v"]


@torch.no_grad()
def test_a_converted_model_loads_and_runs_without_tracr_code(converted):
    d = converted["reverse"]
    rec = json.loads((d / "tracr.json").read_text())
    model = load_native(d)
    assert read_architecture(d) == (4, 1) and not ModelRunner(model).arch.causal
    enc = rec["input_encoding"]
    ids = torch.tensor([[enc[t] for t in ("BOS", "1", "2", "3", "3")]])
    out = ModelRunner(model).logits(ids)[0, 1:].argmax(-1)
    assert [rec["output_values"][i] for i in out.tolist()] == [3, 3, 2, 1]


def test_cli_converts_a_library_program_no_case_uses_and_names_bad_input(tmp_path, capsys):
    assert main(["model", "from-tracr", f"{PROGRAMS}:hist", "--out", str(tmp_path / "hist"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["mismatches"] == 0 and out["components"] >= 2
    assert _truth(tmp_path / "hist")["edges"]
    assert main(["model", "from-tracr", f"{PROGRAMS}:nope", "--out", str(tmp_path / "x")]) != 0
    assert "no 'nope'; functions there:" in capsys.readouterr().err
    with pytest.raises(CircuitkitError, match="must look like FILE.py:NAME"):
        from_tracr("no_colon_here", tmp_path / "y")


def test_the_conversion_records_a_data_task_equal_to_the_committed_one(converted):
    """task.json holds the program's answers on every input (the same table as the committed tracr_reverse) and the
    RASP variables' values; padding an input changes no output; a numerical program's table indexes its readout's
    values (the same table as the committed tracr_frac_prevs)."""
    from circuitkit.models.checkpoint import load_probed

    d = converted["reverse"]
    task = json.loads((d / "task.json").read_text())
    committed = json.loads((PROGRAMS.parents[1] / "models" / "tracr_reverse" / "task.json").read_text())
    assert task["answers"] == committed["answers"] and len(task["answers"]) == 363
    assert task["output_tokens"] == ["1", "2", "3"] and task["pad"] == "compiler_pad"
    assert {"tokens", "indices"} <= set(task["variables"]) and task["output_variable"] in task["variables"]
    check = json.loads((d / "tracr.json").read_text())["check"]
    assert check["padded_checked"] and check["max_abs_diff_padded"] < 1e-4
    assert load_probed(d).task.name == "tracr_reverse"
    frac = json.loads((converted["frac_prevs"] / "task.json").read_text())
    committed = json.loads((PROGRAMS.parents[1] / "models" / "tracr_frac_prevs" / "task.json").read_text())
    assert frac["answers"] == committed["answers"] and len(frac["answers"]) == 1364
    assert frac["output"] == "numerical" and frac["output_tokens"][:3] == ["0.0", "0.2", "0.25"]
    assert json.loads((converted["frac_prevs"] / "tracr.json").read_text())["check"]["readout_mismatches"] == 0
    assert load_probed(converted["frac_prevs"]).task.name == "tracr_frac_prevs"
