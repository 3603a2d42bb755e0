"""Crash consistency of ``circuitkit run``: SIGKILL at seeded random points inside every stage, then the same
command, gives the results of an uninterrupted run; a truncated or altered cache file is named and
recomputed; a full disk during a stage gives one clear error and leaves what was finished intact.

The case is a user's task (first_digit) with a small decoder trained in the run, so that every stage, the
decoder's included, runs in seconds.  ``CIRCUITKIT_CRASH_POINTS`` sets the kill points per stage (default 3).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuitkit.cli import main

USER_FILE = Path(__file__).parent / "user_tasks" / "first_digit.py"
STAGES = ("model", "decoder", "inversions", "patching", "screen", "circuit")
POINTS = max(1, int(os.environ.get("CIRCUITKIT_CRASH_POINTS", "3")))
CASE = """name = "first_digit"
task = "first_digit.py:FirstDigitTask"
seed = 0

[model]
source = "path"
path = "model"

[decoder]
sites = ["a0.0", "a0.1", "x0.post"]
quick_steps = 60
quick_d_model = 32
quick_eval_queries = 5
quick_eval_per_cell = 4
quick_n_per_cell = 4

[inversion]
queries = ["a0.0@=|B31402=3E"]

[hypotheses]
source = "decoder"
quick_source = "decoder"
quick_queries = 8
quick_pairs = 40
quick_verify_inputs = 400
quick_eval_inputs = 100
quick_screen_examples = 60

[circuit]
quick_edge_pairs = 40
"""
#: keys whose values are wall times (they differ between any two runs)
TIMING = re.compile(r"(minute|second|time|elapsed|_s$|^when$|^date$)")


def _run(root: Path, work: str = "work", out: str = "report", limit_bytes: int | None = None,
         **popen) -> subprocess.Popen:
    """``circuitkit run case.toml --quick`` in its own process group, from ``root`` (relative paths, so two
    roots give comparable results)."""
    def limits() -> None:
        os.setsid()
        if limit_bytes is not None:  # a full disk, as a file-size limit: writes past it fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    cmd = [sys.executable, "-m", "circuitkit.cli", "run", "case.toml", "--quick", "--work", work, "--out", out,
           "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limits, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _normalised(path: Path, *roots: Path):
    """The JSON with the run's folders (its own, and the one cached stages were copied from) written as ROOT and
    wall times left out."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not TIMING.search(k)}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    text = path.read_text()
    for root in roots:
        text = text.replace(str(root.resolve()), "ROOT").replace(str(root), "ROOT")
    return strip(json.loads(text))


def _outputs(root: Path, *copied_from: Path) -> dict:
    return {name: _normalised(root / "report" / name, root, *copied_from) for name in ("results.json", "circuit.json")}


def _fresh_root(base: Path, name: str, reference: Path, drop_from: str | None) -> Path:
    """A copy of the case folder (task file, model, TOML) with the reference run's caches of the stages before
    ``drop_from`` (None: no caches)."""
    root = base / name
    root.mkdir()
    for item in ("first_digit.py", "model", "case.toml"):
        src = reference / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    if drop_from is not None:
        keep = STAGES[:STAGES.index(drop_from)]
        (root / "work").mkdir()
        for stage in keep:
            shutil.copytree(reference / "work" / stage, root / "work" / stage)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The case folder and one uninterrupted run in it."""
    root = tmp_path_factory.mktemp("faults") / "reference"
    root.mkdir()
    shutil.copy(USER_FILE, root / "first_digit.py")
    (root / "case.toml").write_text(CASE)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["model", "train", f"{root / 'first_digit.py'}:FirstDigitTask", "--out", str(root / "model"),
                     "--quiet", "--threads", "1"]) == 0
    rc, out, err = _finish(_run(root))
    assert rc == 0, err[-2000:]
    seconds = {s: json.loads((root / "work" / s / "stage.json").read_text())["seconds"] for s in STAGES}
    return root, seconds


def test_two_uninterrupted_runs_agree(reference, tmp_path):
    """The comparison the crash tests rely on: the same command in another folder gives equal outputs."""
    ref, _ = reference
    root = _fresh_root(tmp_path, "again", ref, None)
    rc, _, err = _finish(_run(root))
    assert rc == 0, err[-2000:]
    assert _outputs(root) == _outputs(ref)


@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_anywhere_in_a_stage_then_the_same_command_gives_the_same_results(reference, tmp_path, stage):
    ref, seconds = reference
    rng = random.Random(f"{stage}-crash")
    want = _outputs(ref)
    for point in range(POINTS):
        root = _fresh_root(tmp_path, f"kill{point}", ref, stage)  # stages before this one are cached
        proc = _run(root)
        for line in proc.stdout:  # wait until the stage runs
            if line.startswith(f"[{stage}] running"):
                break
        time.sleep(rng.uniform(0.0, 0.8) * max(seconds[stage], 0.05))
        assert proc.poll() is None, f"the run finished before the kill point in {stage}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        d = root / "work" / stage  # killed mid-stage: the stage is absent or whole, never half-written
        assert d.exists() == (d / "stage.json").exists(), sorted(p.name for p in d.iterdir())
        rc, out, err = _finish(_run(root))
        assert rc == 0, err[-2000:]
        assert _outputs(root, ref) == want, f"{stage}, kill point {point}"
        assert not list((root / "work").glob(".*.tmp"))


def test_a_damaged_cache_is_named_and_recomputed(reference, tmp_path):
    ref, _ = reference
    root = _fresh_root(tmp_path, "damaged", ref, "circuit")
    shutil.copytree(ref / "work" / "circuit", root / "work" / "circuit")
    circuit = root / "work" / "circuit" / "circuit.json"
    circuit.write_bytes(circuit.read_bytes()[:100])  # truncated
    (root / "work" / "patching" / "stage.json").write_text('{"key": ')  # a torn record
    weights = root / "work" / "decoder" / "decoder" / "decoder.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same length, another hash
    weights.write_bytes(bytes(data))
    rc, out, err = _finish(_run(root))
    assert rc == 0, err[-2000:]
    assert "[decoder] the cached stage" in out and "decoder.pt changed since it was written" in out
    assert "[patching] the cached stage" in out and "stage.json is unreadable" in out
    assert "circuit.json has 100 bytes" in out
    assert "[model] cached" in out
    assert _outputs(root, ref) == _outputs(ref)


def test_a_full_disk_during_a_stage_gives_one_clear_error_and_keeps_what_was_finished(reference, tmp_path):
    ref, _ = reference
    root = _fresh_root(tmp_path, "full", ref, "circuit")
    before = {s: (root / "work" / s / "stage.json").read_bytes() for s in STAGES[:-1]}
    rc, out, err = _finish(_run(root, limit_bytes=20_000))  # circuit.json is larger than this
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the disk is full or a file-size limit was reached" in lines[0], err
    assert "Traceback" not in err
    assert not (root / "work" / "circuit").exists() and not (root / "report").exists()
    assert {s: (root / "work" / s / "stage.json").read_bytes() for s in STAGES[:-1]} == before
    rc, out, err = _finish(_run(root))  # room again: the same command finishes from where it stopped
    assert rc == 0, err[-2000:]
    assert all(f"[{s}] cached" in out for s in STAGES[:-1])
    assert _outputs(root, ref) == _outputs(ref)
