"""Checkpoints: training writes a complete artifact, resume reproduces, old formats and bad dirs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from circuitkit.cli import main
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import load_probed
from circuitkit.models.train import TrainConfig, default_config, train_probed
from circuitkit.tasks import get_task


def test_training_artifacts(tiny_counting_model):
    d = tiny_counting_model.path
    for f in ("config.json", "model.safetensors", "circuitkit.json", "metrics.json", "manifest.json"):
        assert (d / f).exists(), f
    man = json.loads((d / "manifest.json").read_text())
    assert man["seed"] == 0 and man["config"]["task"] == "counting" and man["versions"]["torch"].startswith("2.13")
    metrics = json.loads((d / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["train_wall_seconds"] > 0
    assert not d.with_name(d.name + ".partial").exists()


def test_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    """Interrupt at step 30, resume: the weights equal an uninterrupted run with the same seed."""
    task = get_task("addition")
    cfg = TrainConfig(n_layer=1, n_head=2, d_model=16, steps=40, batch_size=16, checkpoint_every=10,
                      warmup=5, eval_limit=50)
    train_probed(task, tmp_path / "straight", cfg, progress=False)

    import circuitkit.models.train as tr

    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def flaky_clip(*a, **k):
        calls["n"] += 1
        if calls["n"] == 31:
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    monkeypatch.setattr(tr.torch.nn.utils, "clip_grad_norm_", flaky_clip)
    with pytest.raises(CircuitkitError, match="rerun the same command to resume"):
        train_probed(task, tmp_path / "resumed", cfg, progress=False)
    assert (tmp_path / "resumed.partial" / "train_state.pt").exists()
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    monkeypatch.setattr(tr.torch.nn.utils, "clip_grad_norm_", real_clip)
    train_probed(task, tmp_path / "resumed", cfg, progress=False)
    a = load_probed(tmp_path / "straight").hf_model.state_dict()
    b = load_probed(tmp_path / "resumed").hf_model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_old_format_checkpoint(tiny_counting_model, tmp_path):
    """A pytorch_model.bin checkpoint (as the paper's code wrote) loads and gives the same logits."""
    old = tmp_path / "old"
    old.mkdir()
    src = tiny_counting_model.path
    (old / "config.json").write_text((src / "config.json").read_text())
    sd = {k: v.clone() for k, v in tiny_counting_model.hf_model.state_dict().items()}
    torch.save(sd, old / "pytorch_model.bin")
    pm = load_probed(old, task="counting")
    ids = pm.task.encode(["Bvvzccvczvvvzvcvc|v:8E"])
    with torch.no_grad():
        assert torch.allclose(pm.runner.logits(ids), tiny_counting_model.runner.logits(ids), atol=1e-6)
    with pytest.raises(CircuitkitError, match="does not say which task"):
        load_probed(old)


def test_bad_checkpoints(tiny_counting_model, tmp_path):
    with pytest.raises(CircuitkitError, match="does not exist"):
        load_probed(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitkitError, match="no config.json"):
        load_probed(tmp_path / "empty", task="counting")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CircuitkitError, match="cannot read"):
        load_probed(bad, task="counting")
    (bad / "config.json").write_text((tiny_counting_model.path / "config.json").read_text())
    with pytest.raises(CircuitkitError, match="cannot load the weights"):
        load_probed(bad, task="counting")
    with pytest.raises(CircuitkitError, match="vocab_size 40 but task 'addition' has 15"):
        load_probed(tiny_counting_model.path, task="addition")


def test_cli_user_errors_exit_2_without_traceback(tiny_counting_model, tmp_path, capsys):
    assert main(["model", "eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["model", "eval", str(tiny_counting_model.path), "--task", "addition"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert main(["model", "train", "sorting", "--out", str(tmp_path / "x")]) == 2
    assert "valid tasks" in capsys.readouterr().err
    assert main(["model", "train", "counting", "--out", str(tmp_path / "y"), "--steps", "0"]) == 2
    assert not (tmp_path / "y").exists()
    assert main(["sites", str(tiny_counting_model.path), "--kinds", "head,bogus"]) == 2
    assert "unknown site kinds" in capsys.readouterr().err


def test_cli_eval_and_sites_json(tiny_counting_model, capsys):
    assert main(["model", "eval", str(tiny_counting_model.path), "--limit", "300", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "counting" and out["n"] == 300
    assert main(["sites", str(tiny_counting_model.path), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert {"site": "a1.0", "hook": "blocks.1.attn.hook_result[0]", "kind": "head", "layer": 1, "head": 0} in sites


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "circuitkit.cli", "model", "eval", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_init_from_continues_from_a_checkpoint(tiny_counting_model, tmp_path):
    task = get_task("counting")
    cfg = TrainConfig(n_layer=2, n_head=1, d_model=64, steps=2, batch_size=8, lr=1e-9, warmup=1, eval_limit=20,
                      init_from=str(tiny_counting_model.path))
    train_probed(task, tmp_path / "cont", cfg, progress=False)
    a = tiny_counting_model.hf_model.state_dict()
    b = load_probed(tmp_path / "cont").hf_model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    man = json.loads((tmp_path / "cont" / "manifest.json").read_text())
    assert man["config"]["init_from"] == str(tiny_counting_model.path) and man["init_from_manifest"]["seed"] == 0
    with pytest.raises(CircuitkitError, match="another architecture"):
        train_probed(task, tmp_path / "bad", cfg.replace(d_model=32, init_from=str(tiny_counting_model.path)),
                     progress=False)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_init_std_sets_the_initial_weight_scale(std):
    """IOI's default starts from std 0.1 (GPT-2's 0.02 stalls on a plateau); counting's from 0.02 with the
    mimetic attention init."""
    from circuitkit.models.train import build_model

    model = build_model(get_task("counting"), TrainConfig(init_std=std))
    w = model.transformer.wte.weight.detach()
    assert abs(float(w.std()) - std) < 0.1 * std
    ioi, counting = default_config(get_task("ioi")), default_config(get_task("counting"))
    assert ioi.init_std == 0.1 and (counting.init_std, counting.attn_init) == (0.02, "mimetic")
