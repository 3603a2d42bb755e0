"""Shared fixtures: tasks and tiny probed models trained once per test session (offline)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# the trusted-task list and other per-user state live in a folder of this session, never the user's cache
os.environ["CIRCUITKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="circuitkit-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from circuitkit.models.checkpoint import ProbedModel, load_probed  # noqa: E402
from circuitkit.models.train import TrainConfig, train_probed  # noqa: E402
from circuitkit.tasks import get_task  # noqa: E402


@pytest.fixture(scope="session")
def counting_task():
    return get_task("counting")


@pytest.fixture(scope="session")
def addition_task():
    return get_task("addition")


def _train_tiny(tmp_path_factory, task_name: str, **kw) -> ProbedModel:
    task = get_task(task_name)
    out = tmp_path_factory.mktemp(f"{task_name}_model") / "ckpt"
    cfg = TrainConfig(**{"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup": 20, "eval_limit": 500,
                         "checkpoint_every": 100, **kw})
    train_probed(task, out, cfg, progress=False)
    return load_probed(out)


@pytest.fixture(scope="session")
def tiny_counting_model(tmp_path_factory) -> ProbedModel:
    """The paper's counting architecture (2L, 1H, d64), briefly trained: real weights, fast."""
    return _train_tiny(tmp_path_factory, "counting", n_layer=2, n_head=1, d_model=64)


@pytest.fixture(scope="session")
def tiny_addition_model(tmp_path_factory) -> ProbedModel:
    """The paper's addition architecture (2L, 4H, d32), briefly trained."""
    return _train_tiny(tmp_path_factory, "addition", n_layer=2, n_head=4, d_model=32)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """``bin/`` of a fresh virtual environment, outside the checkout, holding circuitkit installed from a
    wheel built from this repository (package data included).  Its dependencies are this environment's
    (a .pth line), so nothing is downloaded; circuitkit itself comes only from the wheel."""
    import shutil
    import site
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("wheel")
    repo, src = Path(__file__).resolve().parents[1], root / "src"  # built from a copy: the checkout stays clean
    for name in ("circuitkit", "case_studies"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist")], check=True, cwd=root)
    (wheel,) = (root / "dist").glob("circuitkit-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    (venv_site,) = (root / "venv" / "lib").glob("python3*/site-packages")
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, cwd=root)
    return bin_dir
