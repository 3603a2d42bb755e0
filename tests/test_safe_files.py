"""Files a user hands over are read safely: no unpickling of code, clear errors for truncated or garbage
checkpoints; one run per work directory; what a killed run leaves behind is cleaned up."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from circuitkit.cli import main
from circuitkit.errors import CircuitkitError
from circuitkit.inversion.checkpoint import WEIGHTS, load_decoder
from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
from circuitkit.io_utils import safe_torch_load
from circuitkit.pipeline.run import work_lock
from circuitkit.pipeline.stages import StageRunner, remove_orphans
from circuitkit.sites import parse_site

TINY = dict(d_model=32, n_layers=1, n_heads=2, cond_mid=64, n_cond_blocks=1, batch_size=32, eval_every=50,
            eval_queries=4, eval_per_cell=4, final_eval_queries=0)


class _RunsCode:
    """A pickle payload that creates a file when unpickled (what a crafted checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump({"config": {}, "state_dict": _RunsCode(str(marker))}, f)


@pytest.fixture(scope="module")
def tiny_decoder(tiny_addition_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("safe") / "dec"
    train_decoder(tiny_addition_model, out, DecoderTrainConfig(steps=4, **TINY), sites=[parse_site("x0.pre")],
                  progress=False)
    return out


def test_a_crafted_decoder_that_would_run_code_is_refused(tiny_decoder, tiny_addition_model, tmp_path, capsys):
    bad = tmp_path / "dec"
    shutil.copytree(tiny_decoder, bad)
    marker = tmp_path / "pwned"
    for payload in (lambda p: _crafted(p, marker), lambda p: torch.save({"x": _RunsCode(str(marker))}, p)):
        payload(bad / WEIGHTS)
        with pytest.raises(CircuitkitError, match="refusing to load decoder weights"):
            load_decoder(bad, tiny_addition_model)
        assert not marker.exists()
    rc = main(["invert", str(bad), "--site", "x0.pre@=", "--input", "B615+861=1476E"])
    err = capsys.readouterr().err
    assert rc != 0 and "refusing to load" in err and "Traceback" not in err and not marker.exists()
    assert load_decoder(tiny_decoder, tiny_addition_model).sites  # the genuine one still loads


def test_truncated_and_garbage_checkpoints_get_one_clear_error(tiny_decoder, tiny_addition_model, tmp_path):
    bad = tmp_path / "dec"
    shutil.copytree(tiny_decoder, bad)
    data = (tiny_decoder / WEIGHTS).read_bytes()
    for content in (data[: len(data) // 2], b""):
        (bad / WEIGHTS).write_bytes(content)
        with pytest.raises(CircuitkitError, match="truncated or not a torch checkpoint"):
            load_decoder(bad, tiny_addition_model)
    (bad / WEIGHTS).write_bytes(b"not a checkpoint at all")  # unpickling garbage looks like a foreign pickle
    with pytest.raises(CircuitkitError, match="not a plain tensor checkpoint"):
        load_decoder(bad, tiny_addition_model)
    torch.save([1, 2, 3], bad / WEIGHTS)  # a plain file of the wrong shape
    with pytest.raises(CircuitkitError, match="not a circuitkit decoder"):
        load_decoder(bad, tiny_addition_model)


def test_a_crafted_training_state_is_refused_on_resume(tiny_addition_model, tmp_path):
    out = tmp_path / "dec"
    partial = tmp_path / "elsewhere.partial"  # a caller may keep the state outside the output's folder
    partial.mkdir()
    marker = tmp_path / "pwned"
    _crafted(partial / "train_state.pt", marker)
    with pytest.raises(CircuitkitError, match="refusing to load interrupted decoder training state"):
        train_decoder(tiny_addition_model, out, DecoderTrainConfig(steps=2, **TINY), sites=[parse_site("x0.pre")],
                      progress=False, partial=partial)
    assert not marker.exists() and not out.exists()


def test_plain_tensor_files_still_load(tmp_path):
    obj = {"a": torch.arange(3), "rng": random_state(), "n": 3, "xs": [1.5, None]}
    torch.save(obj, tmp_path / "x.pt")
    back = safe_torch_load(tmp_path / "x.pt", "test state")
    assert torch.equal(back["a"], obj["a"]) and back["rng"] == obj["rng"] and back["xs"] == [1.5, None]


def random_state():
    import random

    return random.Random(0).getstate()


def test_one_run_per_work_directory(tmp_path, capsys):
    work = tmp_path / "work"
    with work_lock(work):
        with pytest.raises(CircuitkitError, match="another 'circuitkit run' is using the work directory"):
            with work_lock(work):
                pass
        rc = main(["run", "addition", "--quick", "--work", str(work), "--out", str(tmp_path / "r"), "--quiet"])
        err = capsys.readouterr().err
        assert rc != 0 and "another 'circuitkit run'" in err and "Traceback" not in err
    with work_lock(work):  # released: the next run proceeds
        pass


def test_orphans_of_a_killed_run_are_removed_and_progress_kept(tmp_path):
    work = tmp_path / "work"
    (work / "decoder").mkdir(parents=True)
    (work / ".decoder.abc123.tmp" / "decoder.partial").mkdir(parents=True)
    (work / "decoder" / ".stage.json.x1.tmp").write_text("half")
    (work / ".circuit.old").mkdir()
    keep = work / ".decoder-0123456789abcdef.partial"
    keep.mkdir()
    (work / "decoder" / "stage.json").write_text("{}")
    removed = remove_orphans(work)
    assert sorted(removed) == sorted([".decoder.abc123.tmp", ".circuit.old", os.path.join("decoder", ".stage.json.x1.tmp")])
    assert keep.exists() and (work / "decoder" / "stage.json").exists()


def test_a_stage_keeps_progress_outside_its_temporary_directory(tmp_path):
    runner = StageRunner(tmp_path, log=lambda *_: None)
    seen = {}

    def fn(d):
        seen["scratch"] = runner.scratch("decoder")
        seen["scratch"].mkdir()
        assert d not in seen["scratch"].parents  # outside the temporary folder the stage writes into
        return {}

    runner.run("decoder", {"a": 1}, fn)
    assert seen["scratch"].parent == tmp_path and seen["scratch"].name.startswith(".decoder-")
    assert not seen["scratch"].exists()  # removed once the stage finished
    with pytest.raises(RuntimeError):
        runner.scratch("circuit")
