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


FORKED = dict(d_model=32, n_heads=2, cond_mid=64, n_cond_blocks=2, batch_size=16, warmup=2, eval_every=2,
              eval_queries=4, eval_per_cell=1, final_eval_queries=6, final_eval_per_cell=2, checkpoint_every=1000,
              processes=2)


def test_forked_processes_train_one_decoder_and_share_out_its_evaluation(tiny_counting_model, tmp_path):
    """``processes = 2`` forks two CPU ranks with one thread each: rank 0 writes the decoder, the hit rates the
    ranks shared out by site equal what this process computes alone with that decoder on one thread, and the same
    seed trains the same decoder again."""
    from circuitkit.inversion.checkpoint import load_decoder
    from circuitkit.inversion.evaluate import evaluate_decoder
    from circuitkit.inversion.train import DecoderTrainConfig, build_for, train_decoder

    pm = tiny_counting_model
    cfg = DecoderTrainConfig(steps=4, **FORKED)
    m = train_decoder(pm, tmp_path / "a", cfg, progress=False)
    assert (m["world_size"], m["torch_threads"], m["steps"]) == (2, 1, 4)
    assert [h["step"] for h in m["history"]] == [2, 4] and len(m["eval"]["sites"]) == len(m["history"][0]["hit_rate"])
    td = load_decoder(tmp_path / "a", pm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = evaluate_decoder(td.decoder.eval(), pm, td.sites, n_queries=6, n_per_cell=2)
    finally:
        torch.set_num_threads(threads)
    assert alone == m["eval"]
    again = train_decoder(pm, tmp_path / "b", cfg, progress=False)
    assert again["eval"] == m["eval"] and again["history"][-1]["loss"] == m["history"][-1]["loss"]
    w0, w1 = td.decoder.state_dict(), load_decoder(tmp_path / "b", pm).decoder.state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(build_for(pm, td.sites, cfg).state_dict()["wte.weight"], w0["wte.weight"])


def test_forked_processes_refuse_what_they_cannot_do(tiny_counting_model, tmp_path):
    """An uneven batch and a GPU are refused up front; an error a rank meets (here: a non-empty --out) comes back
    as this process's CircuitkitError, and nothing is written."""
    import pytest

    from circuitkit.errors import CircuitkitError
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder

    pm = tiny_counting_model
    with pytest.raises(CircuitkitError, match="not divisible by processes 2"):
        train_decoder(pm, tmp_path / "a", DecoderTrainConfig(steps=2, **{**FORKED, "batch_size": 15}), progress=False)
    with pytest.raises(CircuitkitError, match="forks CPU ranks"):
        train_decoder(pm, tmp_path / "a", DecoderTrainConfig(steps=2, **FORKED), progress=False, device="cuda")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(CircuitkitError, match="exists and is not empty"):
        train_decoder(pm, tmp_path / "full", DecoderTrainConfig(steps=2, **FORKED), progress=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert not (tmp_path / "a").exists()
