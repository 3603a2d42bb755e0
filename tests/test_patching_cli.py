"""``circuitkit patch`` and ``circuitkit patch-table`` end to end."""
from __future__ import annotations

import json

from circuitkit.cli import main


def _json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out.strip() else None), out.err


def test_patch_cli_modes(tiny_addition_model, capsys):
    m = str(tiny_addition_model.path)
    rc, d, _ = _json(capsys, ["patch", m, "--site", "a1.0@=", "a0.2@=", "--n", "16", "--metric", "logit", "--json"])
    assert rc == 0 and d["n"] == 16 and d["sites"] == ["a1.0@=", "a0.2@="]
    assert d["effect"]["ci_low"] <= d["effect"]["mean"] <= d["effect"]["ci_high"]
    rc, d, _ = _json(capsys, ["patch", m, "--sweep", "head", "--n", "8", "--metric", "prob", "--quiet", "--json"])
    assert rc == 0 and d["shape"] == [2, 14, 4] and len(d["ci_low"]) == 2
    rc, d, _ = _json(capsys, ["patch", m, "--sender", "a0.1@6", "--receiver", "a1.2", "--receiver-input", "v",
                              "--n", "8", "--metric", "logit", "--json"])
    assert rc == 0 and d["sites"] == ["a0.1@6 -> a1.2.v"]
    rc, d, _ = _json(capsys, ["patch", m, "--attribution", "--n", "8", "--metric", "logit", "--json"])
    assert rc == 0 and "a0.3" in d["nodes"] and any(e["receiver"] == "logits" for e in d["edges"])


def test_patch_cli_errors(tiny_addition_model, capsys):
    m = str(tiny_addition_model.path)
    for argv, msg in (
        (["patch", m, "--site", "a3.0@=", "--n", "4"], "layer 3 does not exist"),
        (["patch", m, "--site", "a1.0@Q", "--n", "4"], "unknown position"),
        (["patch", m, "--site", "a1.0@=", "--metric", "f1", "--n", "4"], "unknown metric"),
        (["patch", m, "--site", "a1.0@=", "--base", "B123+456=579E", "--source", "B1+2=3E", "B1+2=3E"],
         "one source per base"),
        (["patch", m, "--sender", "a0.1@6", "--n", "4"], "both --sender and --receiver"),
        (["patch", m, "--sweep", "heads", "--n", "4"], "unknown sweep kind"),
    ):
        rc, _, err = _json(capsys, argv)
        assert rc == 2 and msg in err, (argv, err)


def test_patch_table_cli(tiny_counting_model, tmp_path, capsys):
    rc = main(["patch-table", str(tiny_counting_model.path), "--n", "16", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "| R |" in out and "| F |" in out
    data = json.loads((tmp_path / "counting_patch_table.json").read_text())
    assert set(data["results"]) == {"R", "F"} and len(data["results"]["R"]["steps"]) == 8


def test_verbs_load_a_checkpoint_that_does_not_name_its_task(tiny_counting_model, tmp_path, capsys):
    """A bare transformers checkpoint (no circuitkit.json): patch-table needs no task (it is counting's table),
    decoder train takes --task, and without it the error names an option the verb has."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_counting_model.path / f, bare / f)
    assert main(["patch-table", str(bare), "--n", "16", "--out", str(tmp_path / "table")]) == 0
    capsys.readouterr()
    assert main(["decoder", "train", str(bare), "--out", str(tmp_path / "d0"), "--steps", "1"]) == 2
    assert "pass --task" in capsys.readouterr().err
    assert main(["decoder", "train", str(bare), "--task", "counting", "--out", str(tmp_path / "d1"), "--steps", "2",
                 "--d-model", "16", "--layers", "1", "--heads", "2", "--final-eval-queries", "0",
                 "--sites", "x0.pre"]) == 0
