"""The README's Python example runs as written (on the committed addition model) and finds what it says."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "case_studies").symlink_to(REPO / "case_studies")  # the example's paths, from a scratch root
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    ck, circuit, ver = namespace["ck"], namespace["circuit"], namespace["ver"]
    assert ck.__name__ == "circuitkit"
    # A1 = F1 + S1 + the carry into column 1: a layer-1 head at '=' is verified to carry one of those inputs
    a1_inputs = {"F1", "S1", "F1+S1", "carry(2)"}
    assert any(n.site.endswith("@=") and set(n.features) & a1_inputs and n.learned and n.iia_ci[0] >= 0.8
               for n in ver.nodes), ver.nodes
    assert circuit.faithfulness["all"] >= 0.9  # grown to the default target
    saved = json.loads((tmp_path / "runs" / "api_example" / "circuit.json").read_text())
    assert saved == json.loads(circuit.to_json()) and {n["id"] for n in saved["nodes"]} >= set(circuit.sites)
    assert json.loads(ver.to_json())["nodes"] and "a1." in capsys.readouterr().out
