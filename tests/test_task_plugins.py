"""Tasks from outside the package: a file (``FILE.py:Class``), a module (``pkg.mod:Class``) and an
installed entry point, through every verb with no flag after training; and the errors when a spec,
a file or a recorded task is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from circuitkit.cli import main
from circuitkit.errors import CircuitkitError
from circuitkit.pipeline.config import load_case
from circuitkit.tasks import get_task
from circuitkit.tasks.registry import load_task, task_from_record, task_record

USER_FILE = Path(__file__).parent / "user_tasks" / "first_digit.py"
SPEC = f"{USER_FILE}:FirstDigitTask"


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def user_task_dir(tmp_path_factory):
    """A copy of the user's task file (its own folder, so edits in a test cannot touch the original)."""
    d = tmp_path_factory.mktemp("user_task")
    shutil.copy(USER_FILE, d / "first_digit.py")
    return d


@pytest.fixture(scope="module")
def user_model(user_task_dir, tmp_path_factory):
    """`model train FILE.py:Class` with the recipe the task itself declares (1L, 2H, d32, 1,500 steps)."""
    out = tmp_path_factory.mktemp("user_model") / "ckpt"
    assert main(["model", "train", f"{user_task_dir / 'first_digit.py'}:FirstDigitTask", "--out", str(out),
                 "--quiet", "--threads", "1"]) == 0
    return out


def test_a_task_in_a_user_file_goes_through_every_verb_without_a_flag(user_model, tmp_path, capsys):
    man = json.loads((user_model / "manifest.json").read_text())
    assert (man["config"]["n_layer"], man["config"]["n_head"], man["config"]["steps"]) == (1, 2, 1500)  # its recipe
    _every_verb(user_model, tmp_path, capsys)


@pytest.mark.parametrize("arch, extra", [("gpt_neox", []), ("llama", ["--kv-heads", "1"])])
def test_other_block_families_train_and_go_through_every_verb(arch, extra, user_task_dir, tmp_path, capsys):
    """`model train --arch` builds a GPT-NeoX (parallel residual, rotary) or a Llama (RMSNorm, rotary, gated
    MLP, two query heads sharing one key/value head) model; hypotheses, verification and the circuit's
    evaluation then run on it as on GPT-2 and find the same mechanism."""
    out = tmp_path / arch
    rc, _, err = _run(capsys, ["model", "train", f"{user_task_dir / 'first_digit.py'}:FirstDigitTask", "--out",
                               str(out), "--arch", arch, *extra, "--quiet", "--threads", "1"])
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert cfg.get("num_key_value_heads", cfg["num_attention_heads"]) == (1 if extra else 2)
    _every_verb(out, tmp_path, capsys, min_iia_low=0.8)  # the verifier's own threshold (50 pairs: 47/50 passes)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "bert"], "unknown architecture 'bert'; valid: gpt2, gpt_neox, llama"),
    (["--kv-heads", "1"], "key/value heads (--kv-heads) are a llama option"),
    (["--arch", "llama", "--kv-heads", "3"], "--kv-heads 3 must be a positive divisor of --heads 2"),
    (["--arch", "gpt_neox", "--attn-init", "mimetic"], "mimetic attention init is written for GPT-2"),
])
def test_bad_architecture_options_are_named(argv, message, tmp_path, capsys):
    rc, _, err = _run(capsys, ["model", "train", SPEC, "--out", str(tmp_path / "m"), *argv, "--quiet"])
    assert rc != 0 and message in err, err
    assert not (tmp_path / "m").exists()


def _every_verb(user_model: Path, tmp_path: Path, capsys, min_iia_low: float = 0.9) -> None:
    """model eval, sites, hypothesize, verify and circuit on a first_digit model, with no --task flag: a head
    at '=' carries the first digit (IIA CI low >= ``min_iia_low``) and the circuit is faithful."""
    model = str(user_model)
    rc, out, err = _run(capsys, ["model", "eval", model, "--quiet", "--json"])  # no --task: the checkpoint says
    assert rc == 0, err
    ev = json.loads(out)
    assert ev["task"] == "first_digit" and ev["accuracy"] >= 0.95
    rc, out, err = _run(capsys, ["sites", model, "--json"])
    assert rc == 0, err
    assert json.loads(out)["positions"] == ["BOS", "D1", "D5", "=", "ANS"]
    hyp, ver, circ = tmp_path / "hyp.json", tmp_path / "ver.json", tmp_path / "circuit"
    rc, out, err = _run(capsys, ["hypothesize", model, "--sites", "a0.0,a0.1,m0", "--positions", "=,D5",
                                 "--queries", "20", "--pool", "1500", "--out", str(hyp), "--json"])
    assert rc == 0, err
    accepted = {(h["site"], h["feature"]) for h in json.loads(out)["hypotheses"] if h["accepted"]}
    assert any(s in {"a0.0@=", "a0.1@="} and f == "first" for s, f in accepted), accepted
    rc, out, err = _run(capsys, ["verify", model, "--hypotheses", str(hyp), "--inputs", "600", "--pairs", "50",
                                 "--out", str(ver), "--json"])
    assert rc == 0, err
    verified = [v for v in json.loads(out)["verdicts"] if v["verified"]]
    # the answer is the first digit: a head at '=' must be found to carry it, with the task's own feature; or the
    # two heads together, as a site group confirmed on held-out inputs (a model may split the copy between heads)
    alone, together = {"a0.0@=", "a0.1@="}, {"a0.0@= & a0.1@=", "a0.1@= & a0.0@="}
    assert any((v["site"] in alone or (v["site"] in together and v["split"] == "confirm"))
               and v["features"] == ["first"] and v["targets"][0]["iia"]["ci_low"] >= min_iia_low
               for v in verified), verified
    assert not any("last" in v["features"] for v in verified)  # the fifth digit never reaches the answer
    rc, out, err = _run(capsys, ["circuit", model, "--verified", str(ver), "--out", str(circ), "--inputs", "600",
                                 "--eval-inputs", "200", "--no-picture", "--json"])
    assert rc == 0, err
    assert json.loads(out)["evaluation"]["faithfulness_normalized"]["all"] >= 0.9


def test_module_and_entry_point_specs_load_the_same_task(tmp_path, monkeypatch):
    by_module = load_task("tests.user_tasks.first_digit:FirstDigitTask")
    assert by_module.name == "first_digit" and task_record(by_module) == {
        "spec": "tests.user_tasks.first_digit:FirstDigitTask"}
    dist = tmp_path / "firstdigit_plugin-1.0.dist-info"  # what `pip install` of a plug-in package leaves
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: firstdigit-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[circuitkit.tasks]\nfirst = tests.user_tasks.first_digit:FirstDigitTask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("first")
    assert type(task).__name__ == "FirstDigitTask" and task_record(task) == {"spec": "first"}
    with pytest.raises(CircuitkitError, match=r"valid tasks: counting, addition, ioi, first"):
        get_task("sorting")


def test_a_case_toml_names_a_task_file_and_a_model_relative_to_itself(user_task_dir, user_model):
    (user_task_dir / "models").mkdir(exist_ok=True)
    shutil.copytree(user_model, user_task_dir / "models" / "m", dirs_exist_ok=True)
    (user_task_dir / "case.toml").write_text(
        'name = "first_digit"\ntask = "first_digit.py:FirstDigitTask"\n\n[model]\nsource = "path"\n'
        'path = "models/m"\n\n[inversion]\nqueries = ["a0.0@=|B31402=3E"]\n')
    cfg = load_case(str(user_task_dir / "case.toml"))
    assert cfg.load_task().name == "first_digit"
    assert cfg.resolve(cfg.model.path) == user_task_dir / "models" / "m"
    bad = user_task_dir / "bad.toml"
    bad.write_text('name = "x"\ntask = "nowhere.py:FirstDigitTask"\n')
    with pytest.raises(CircuitkitError, match=r"bad.toml: 1 problem: task: task file .*nowhere.py' does not exist"):
        load_case(str(bad))


def _user_file(tmp_path: Path, body: str) -> str:
    f = tmp_path / "mytask.py"
    f.write_text(body)
    return str(f)


@pytest.mark.parametrize("body,cls,message", [
    ("x = 1\n", "MyTask", r"has no class 'MyTask'; Task subclasses there: none"),
    ("class MyTask:\n    pass\n", "MyTask", r"not a subclass of circuitkit.tasks.Task"),
    ("import not_a_module_anywhere\n", "MyTask", r"importing task file .* failed: ModuleNotFoundError"),
    ("raise ValueError('boom')\n", "MyTask", r"failed: ValueError: boom"),
    ("from tests.user_tasks.first_digit import FirstDigitTask\n\nclass MyTask(FirstDigitTask):\n"
     "    def __init__(self, n):\n        super().__init__()\n", "MyTask", r"could not be constructed with no arguments"),
])
def test_bad_task_files_are_named(tmp_path, body, cls, message):
    with pytest.raises(CircuitkitError, match=message):
        load_task(f"{_user_file(tmp_path, body)}:{cls}")


@pytest.mark.parametrize("spec,message", [
    ("missing_dir/task.py:X", r"task file .*task.py' does not exist"),
    ("task.py", r"names a file but no class: write task.py:ClassName"),
    ("tests.user_tasks.first_digit:", r"must end in ':ClassName'"),
    ("no_such_package.mod:X", r"module 'no_such_package.mod' cannot be imported"),
    ("tests.user_tasks.first_digit:Nope", r"module 'tests.user_tasks.first_digit' has no class 'Nope'"),
    ("", r"empty task spec"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(CircuitkitError, match=message):
        load_task(spec)


def test_a_recorded_task_file_runs_only_if_unchanged_and_outside_the_checkpoint(user_model, tmp_path, capsys):
    task_file = tmp_path / "first_digit.py"
    shutil.copy(USER_FILE, task_file)
    record = task_record(load_task(f"{task_file}:FirstDigitTask"))
    assert task_from_record(record, "first_digit", str(tmp_path / "ckpt")).name == "first_digit"
    task_file.write_text(task_file.read_text() + "\n# edited\n")
    with pytest.raises(CircuitkitError, match=r"changed since .* was written"):
        task_from_record(record, "first_digit", str(tmp_path / "ckpt"))
    with pytest.raises(CircuitkitError, match=r"names a task file inside itself"):
        task_from_record(record, "first_digit", str(tmp_path))
    task_file.unlink()
    with pytest.raises(CircuitkitError, match=r"no longer exists"):
        task_from_record(record, "first_digit", str(tmp_path / "ckpt"))
    # a checkpoint whose task file is gone still loads with the task named explicitly
    moved = tmp_path / "moved.py"
    shutil.copy(USER_FILE, moved)
    rc, out, err = _run(capsys, ["model", "eval", str(user_model), "--task", f"{moved}:FirstDigitTask", "--quiet",
                                 "--limit", "50", "--json"])
    assert rc == 0, err


def test_a_bad_model_recipe_is_refused_by_name():
    from circuitkit.models.train import default_config

    task = load_task(SPEC)
    task.model_recipe = {"n_layers": 2}
    with pytest.raises(CircuitkitError, match=r"model_recipe has unknown training options \['n_layers'\]"):
        default_config(task)


# ---- consent: a task file that an artefact names runs only with the user's word for it ------------------------

MARKER_LINE = "import pathlib as _p\n_p.Path(__file__).with_suffix('.ran').write_text('ran')\n"


def _hostile_checkpoint(user_model: Path, dest: Path, record: dict, name: str = "first_digit") -> Path:
    """A copy of a real checkpoint whose circuitkit.json says what ``record`` says."""
    ckpt = dest / "ckpt"
    shutil.copytree(user_model, ckpt)
    meta = json.loads((ckpt / "circuitkit.json").read_text())
    meta["task"], meta["task_ref"] = name, record
    (ckpt / "circuitkit.json").write_text(json.dumps(meta))
    return ckpt


def _marked_copy(path: Path) -> Path:
    """A working task file that leaves ``<name>.ran`` beside itself when its code runs."""
    path.write_text(USER_FILE.read_text() + MARKER_LINE)
    return path


def test_a_checkpoint_naming_a_task_file_inside_itself_without_a_hash_runs_nothing(user_model, tmp_path, capsys):
    ckpt = _hostile_checkpoint(user_model, tmp_path, {})
    evil = _marked_copy(ckpt / "evil.py")
    meta = json.loads((ckpt / "circuitkit.json").read_text())
    meta["task_ref"] = {"spec": f"{evil}:FirstDigitTask"}  # no file_sha256
    (ckpt / "circuitkit.json").write_text(json.dumps(meta))
    for argv in (["sites", str(ckpt)], ["model", "eval", str(ckpt), "--limit", "20"],
                 ["sites", str(ckpt), "--trust-task"]):  # consent to the unhashable is not possible either
        rc, _, err = _run(capsys, argv)
        assert rc == 2 and "without its sha256" in err and "untrusted" in err, err
    assert not evil.with_suffix(".ran").exists()


def test_a_sibling_task_file_runs_only_after_the_user_names_it(user_model, tmp_path, capsys):
    """A file beside the checkpoint (as in an archive), with a matching sha256, still needs consent: refused,
    then run with --trust-task (which remembers it), or after the user named it with --task."""
    for how in ("trust-flag", "named"):
        d = tmp_path / how
        d.mkdir()
        sibling = _marked_copy(d / "task.py")
        sibling.write_text(sibling.read_text() + f"# {how}\n")  # a content the session has not trusted yet
        ckpt = _hostile_checkpoint(user_model, d, _record(sibling))
        rc, _, err = _run(capsys, ["sites", str(ckpt)])
        assert rc == 2 and "which you have not named yourself" in err and "--trust-task" in err, err
        assert f"--task {sibling}:FirstDigitTask" in err
        assert not sibling.with_suffix(".ran").exists()
        if how == "trust-flag":
            rc, _, err = _run(capsys, ["sites", str(ckpt), "--trust-task"])
        else:
            rc, _, err = _run(capsys, ["model", "eval", str(ckpt), "--task", f"{sibling}:FirstDigitTask",
                                       "--limit", "20"])
        assert rc == 0, err
        assert sibling.with_suffix(".ran").exists()
        rc, _, err = _run(capsys, ["sites", str(ckpt), "--json"])  # remembered: no flag needed any more
        assert rc == 0, err


def _record(file: Path, spec: str | None = None) -> dict:
    """What another machine would have recorded for ``file`` (task_record's form), written without trusting it."""
    import hashlib

    return {"spec": spec or f"{file}:FirstDigitTask", "file_sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def test_a_relative_task_spec_resolved_against_the_working_directory_is_refused(user_model, tmp_path, monkeypatch,
                                                                                capsys):
    d = tmp_path / "archive"
    d.mkdir()
    sibling = _marked_copy(d / "rel_task.py")
    sibling.write_text(sibling.read_text() + "# relative\n")
    ckpt = _hostile_checkpoint(user_model, d, _record(sibling, "rel_task.py:FirstDigitTask"))
    monkeypatch.chdir(d)
    rc, _, err = _run(capsys, ["sites", str(ckpt)])
    assert rc == 2 and "which you have not named yourself" in err, err
    assert not sibling.with_suffix(".ran").exists()


def test_a_recorded_module_inside_the_checkpoint_or_a_file_as_a_bare_name_is_refused(user_model, tmp_path,
                                                                                     monkeypatch, capsys):
    ckpt = _hostile_checkpoint(user_model, tmp_path, {"spec": "ckpt_evil_mod:FirstDigitTask"})
    _marked_copy(ckpt / "ckpt_evil_mod.py")
    monkeypatch.syspath_prepend(str(ckpt))  # as if the user ran python from inside the archive
    rc, _, err = _run(capsys, ["sites", str(ckpt)])
    assert rc == 2 and "resolves inside itself" in err, err
    assert not (ckpt / "ckpt_evil_mod.ran").exists()
    # a decoder or checkpoint whose bare task name is a file spec: a name never loads a file
    outside = _marked_copy(tmp_path / "named.py")
    with pytest.raises(CircuitkitError, match=r"neither built in nor installed"):
        task_from_record(None, f"{outside}:FirstDigitTask", str(ckpt))
    with pytest.raises(CircuitkitError, match=r"neither built in nor installed"):
        task_from_record({"spec": "no_such_task"}, None, str(ckpt))
    assert not outside.with_suffix(".ran").exists()


def test_a_damaged_trusted_list_is_named(tmp_path, monkeypatch):
    from circuitkit.tasks import trust

    monkeypatch.setenv(trust.CACHE_ENV, str(tmp_path))
    (tmp_path / trust.ALLOWLIST_FILE).write_text("{not json")
    with pytest.raises(CircuitkitError, match=r"trusted-task list .* is damaged"):
        load_task(SPEC)
    (tmp_path / trust.ALLOWLIST_FILE).unlink()
    load_task(SPEC)
    assert json.loads((tmp_path / trust.ALLOWLIST_FILE).read_text())["files"]  # the user's word is remembered


def test_commands_trusting_files_at_once_all_keep_their_entries(tmp_path, monkeypatch):
    """The trusted list is read, changed and written under a file lock: four processes that start together and
    add 40 files each leave all 160 (without the lock, their read-modify-writes lose entries)."""
    import subprocess
    import sys
    import time

    from circuitkit.tasks import trust

    monkeypatch.setenv(trust.CACHE_ENV, str(tmp_path))
    start = time.time() + 4  # after every process has imported circuitkit
    code = ("import sys, time; from pathlib import Path; from circuitkit.tasks import trust\n"
            f"time.sleep(max(0, {start} - time.time()))\n"
            "for i in range(40): trust.trust(Path(f'/x/{sys.argv[1]}_{i}.py'), f'{sys.argv[1]}{i:063d}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)]) for k in range(1, 5)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = json.loads((tmp_path / trust.ALLOWLIST_FILE).read_text())["files"]
    assert len(files) == 160 and all(trust.is_trusted(f"{k}{i:063d}") for k in range(1, 5) for i in range(40))
