"""Work shared over torch.distributed ranks (``circuitkit.shards``): 2 CPU ranks (gloo, via torchrun) give results
identical to one process for sweeps, interchange verification and circuit evaluation, and each rank runs
only its share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitkit import shards
from circuitkit.circuit.evaluate import AblationEvaluator
from circuitkit.patching.inputs import bases_and_sources
from circuitkit.patching.sweep import sweep

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _one_process(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuitkit", *argv], capture_output=True, text=True, timeout=600,
                          env=ENV)


def _two_ranks(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(shards.launch_command(argv, nproc=2), capture_output=True, text=True, timeout=600, env=ENV)


def _same_artifacts(a: Path, b: Path) -> None:
    """Every file rank 0 wrote equals the one process's, byte for byte."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between 1 and 2 ranks"


@pytest.fixture(scope="module")
def verified_claims(tiny_addition_model, tmp_path_factory) -> Path:
    """A verification report of a few claims on the tiny addition model, written by one process."""
    out = tmp_path_factory.mktemp("verify1") / "v.json"
    r = _one_process(["verify", str(tiny_addition_model.path), *_CLAIMS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


_CLAIMS = ["--claim", "a0.0@=", "F1", "--claim", "a0.1@=", "F1", "--claim", "a1.0@=", "S1", "--claim", "a1.1@=",
           "F1+S1", "--claim", "m1@=", "S1", "--inputs", "400", "--pairs", "60", "--seed", "3"]


def test_two_ranks_sweep_verify_circuit_identical(tiny_addition_model, verified_claims, tmp_path):
    model = str(tiny_addition_model.path)
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "v").mkdir(parents=True)
    (two / "v").mkdir(parents=True)
    runs = [(["patch", model, "--sweep", kind, "--n", "48", "--quiet", "--out"], f"{kind}.json")
            for kind in ("head", "resid_pre")]  # a row-direct kind and one that runs the patched block in full
    runs.append((["verify", model, *_CLAIMS, "--out"], "v/v.json"))
    for argv, name in runs:
        r1, r2 = _one_process([*argv, str(one / name)]), _two_ranks([*argv, str(two / name)])
        assert r1.returncode == 0, r1.stderr[-3000:]
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert r2.stdout.strip() == r1.stdout.strip().replace(str(one), str(two))  # rank 0 prints, once
    circuit = ["circuit", model, "--verified", str(verified_claims), "--inputs", "300", "--eval-inputs", "600",
               "--edge-pairs", "30", "--no-picture", "--seed", "1", "--out"]  # 600 inputs: 3 evaluation batches
    r1, r2 = _one_process([*circuit, str(one / "c")]), _two_ranks([*circuit, str(two / "c")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    _same_artifacts(one, two)
    c = json.loads((two / "c" / "circuit.json").read_text())
    assert c["evaluation"]["faithfulness_normalized"]  # a real evaluation was compared, not an empty one


def test_torchrun_refuses_a_command_that_does_not_shard(tiny_addition_model, tmp_path):
    r = _two_ranks(["model", "eval", str(tiny_addition_model.path)])
    assert r.returncode != 0
    assert "does not run across processes" in r.stderr and "patch, hypothesize, verify, circuit" in r.stderr


class _Rank:
    """Pretend to be rank ``rank`` of ``size`` in one process (collectives return this rank's own part)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rank: int, size: int = 2) -> None:
        monkeypatch.setattr(shards, "world", lambda: (rank, size))
        monkeypatch.setattr(shards, "sum_disjoint", lambda t: t)


def test_each_rank_sweeps_only_its_chunks(tiny_addition_model, monkeypatch):
    pm = tiny_addition_model
    base, source = bases_and_sources(pm.task, None, None, 24, "random", 5, True)
    full = sweep(pm, base, "head", source, max_rows=64, progress=False).values
    parts = []
    for rank in (0, 1):
        with monkeypatch.context() as m:
            _Rank(m, rank)
            parts.append(sweep(pm, base, "head", source, max_rows=64, progress=False).values)
    moved = [p != full for p in parts]  # a rank leaves the other's cells at zero
    assert all(bool(m.any()) for m in moved), "each rank ran some chunks and left others to the other rank"
    assert not bool((moved[0] & moved[1]).any()), "every cell was computed by one of the two ranks"
    merged = torch.where(moved[0], parts[1], parts[0])
    assert torch.equal(merged, full)


def test_each_rank_evaluates_only_its_batches(tiny_addition_model, monkeypatch):
    ev = AblationEvaluator(tiny_addition_model, n=300, batch_size=100, n_boot=10)
    keep = ev.mask(["a1.0@=", "m1@="])
    full = ev._incremental_pair_logits(keep)
    with monkeypatch.context() as m:
        _Rank(m, 1)
        part = ev._incremental_pair_logits(keep)
    assert len(part) == len(full) == 3
    assert torch.equal(part[1], full[1])  # batch 1 is rank 1's
    assert not torch.equal(part[0], full[0]) and not bool(part[0].any())  # batch 0 is rank 0's: left at zero
