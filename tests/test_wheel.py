"""The wheel ships every package and the case studies' package data (configs and probed models)."""
from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_explicit_package_list_names_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "circuitkit").rglob("__init__.py")}
    assert listed == found | {"circuitkit.case_studies"}, listed ^ (found | {"circuitkit.case_studies"})


def test_the_installed_wheel_finds_its_cases_and_models_outside_the_checkout(installed_wheel, tmp_path):
    code = ("from circuitkit.pipeline.config import available_cases, load_case; c = load_case('addition'); "
            "print(available_cases(), c.resolve(c.model.path))")
    out = subprocess.run([str(installed_wheel / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert "['addition', 'counting', 'ioi', 'tracr_frac_prevs', 'tracr_reverse']" in out
    model = Path(out.split("] ", 1)[1].strip())
    assert str(model).startswith(str(installed_wheel.parent)) and (model / "model.safetensors").is_file()
