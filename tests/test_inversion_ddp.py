"""DistributedDataParallel decoder training: 2 CPU processes (gloo) end with identical weights."""
from __future__ import annotations

import os
import subprocess

import torch

from circuitkit.inversion.distributed import launch_command


def test_ddp_two_processes_identical_weights(tiny_addition_model, tmp_path):
    wdir = tmp_path / "weights"
    cmd = launch_command(str(tiny_addition_model.path), str(tmp_path / "dec"), nproc=2,
                         extra=["--steps", "3", "--batch-size", "8", "--d-model", "32", "--eval-every", "100",
                                "--final-eval-queries", "0", "--save-rank-weights", str(wdir)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    w0 = torch.load(wdir / "rank0.pt")
    w1 = torch.load(wdir / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # training moved the weights (not just the initial broadcast) and rank 0 wrote the decoder
    from circuitkit.inversion.train import DecoderTrainConfig, build_for, decoder_sites

    init = build_for(tiny_addition_model, decoder_sites(tiny_addition_model),
                     DecoderTrainConfig(d_model=32, cond_mid=64)).state_dict()
    assert not torch.equal(init["wte.weight"], w0["wte.weight"])
    assert (tmp_path / "dec" / "decoder.pt").exists()


def test_ddp_with_length_groups_ends_with_identical_weights(tiny_counting_model, tmp_path):
    """Counting's batches run in length groups (several forwards and backwards a step, all-reduced after the
    last): the ranks still end with identical weights."""
    wdir = tmp_path / "weights"
    cmd = launch_command(str(tiny_counting_model.path), str(tmp_path / "dec"), nproc=2,
                         extra=["--steps", "3", "--batch-size", "16", "--d-model", "32", "--eval-every", "100",
                                "--final-eval-queries", "0", "--length-groups", "2", "--save-rank-weights",
                                str(wdir)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = torch.load(wdir / "rank0.pt"), torch.load(wdir / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
