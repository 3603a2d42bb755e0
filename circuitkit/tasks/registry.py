"""Finding a Task by its spec: a built-in name, ``path/to/file.py:Class``, ``package.module:Class``,
or a name an installed package registers under the ``circuitkit.tasks`` entry-point group.

A checkpoint records the spec of its task (``task_record``), so later verbs reload a user's task
with no flag (``task_from_record``).  Specs come from two places, trusted differently:
- the user (``load_task``: ``--task``, ``model train TASK``, a case TOML): a task file named there runs, and
  its sha256 joins the user's allowlist (``tasks/trust.py``);
- an artefact (``task_from_record``: a checkpoint, a decoder): a task file runs only if it still has the
  content it had when the artefact was written, lies outside the artefact's directory, and its content is
  on the user's allowlist (or ``--trust-task`` is given); a bare name only resolves to a built-in or
  installed task, and a module only if it is not found inside the artefact's directory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks import trust
from circuitkit.tasks.base import Task

#: entry-point group an installed package uses to register tasks: ``name = "pkg.module:Class"``
ENTRY_POINT_GROUP = "circuitkit.tasks"

SPEC_FORMS = ("a built-in name, path/to/file.py:Class, package.module:Class, prompt_pairs:FILE.jsonl, tracr:DIR "
              "(tracr: alone = the model's own) or an installed task name")
#: the spec prefix of the prompt-pairs task (``tasks/prompt_pairs.py``)
PROMPT_PAIRS = "prompt_pairs:"
#: the spec prefix of a tracr-compiled model's task (``tasks/tracr.py``): data in the model directory, never code
TRACR = "tracr:"


def _builtin(module: str, cls: str) -> Callable[[], Task]:
    def make() -> Task:
        return getattr(importlib.import_module(module), cls)()

    return make


#: the tasks that ship with circuitkit (the paper's case studies)
BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "counting": _builtin("circuitkit.tasks.counting", "CountingTask"),
    "addition": _builtin("circuitkit.tasks.addition", "AdditionTask"),
    "ioi": _builtin("circuitkit.tasks.ioi", "IOITask"),
}


def installed_tasks() -> dict[str, Any]:
    """Entry points of installed packages in the ``circuitkit.tasks`` group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    """Every task reachable by a bare name: built-in first, then installed."""
    return list(BUILTIN_TASKS) + sorted(set(installed_tasks()) - set(BUILTIN_TASKS))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_spec(spec: str) -> tuple[str, str]:
    target, _, cls = spec.rpartition(":")
    if not target or not cls.isidentifier():
        raise CircuitkitError(f"task spec {spec!r} must end in ':ClassName' after the file or module; "
                              f"valid forms: {SPEC_FORMS}")
    return target, cls


def _instantiate(cls: Any, spec: str) -> Task:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise CircuitkitError(f"{spec!r} names {cls!r}, which is not a subclass of circuitkit.tasks.Task")
    try:
        task = cls()
    except Exception as e:  # noqa: BLE001 - a user's constructor may raise anything; say whose it was
        raise CircuitkitError(f"task {spec!r} could not be constructed with no arguments: "
                              f"{type(e).__name__}: {e}") from None
    for attr in ("name", "seq_len", "tokenizer", "position_names", "default_target"):
        if not hasattr(task, attr):
            raise CircuitkitError(f"task {spec!r} does not set {attr!r}; a Task sets name, seq_len, tokenizer, "
                                  "position_names and default_target")
    task.spec = spec
    return task


#: called with (file, sha256) before a task file's code runs; raises to refuse it
FileCheck = Callable[[Path, str], None]


def _trust_named(file: Path, digest: str) -> None:
    """The user named this file: it runs, and its content joins the allowlist."""
    trust.trust(file, digest)


def _load_file_class(file: Path, cls_name: str, spec: str, check: FileCheck = _trust_named) -> Task:
    """Import ``file`` (its bytes read once: the content checked is the content run) and build ``cls_name``."""
    if not file.is_file():
        raise CircuitkitError(f"task file {str(file)!r} does not exist (from task spec {spec!r})")
    if file.suffix != ".py":
        raise CircuitkitError(f"task file {str(file)!r} is not a .py file (from task spec {spec!r})")
    source = file.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    check(file, digest)
    module_name = f"circuitkit_user_task_{digest[:16]}"
    module = sys.modules.get(module_name)
    if module is None:
        module = types.ModuleType(module_name)
        module.__file__ = str(file)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up by module name
        try:
            exec(compile(source, str(file), "exec"), module.__dict__)  # noqa: S102 - the user's consented task file
        except Exception as e:  # noqa: BLE001 - a user's file may raise anything on import
            del sys.modules[module_name]
            raise CircuitkitError(f"importing task file {str(file)!r} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, cls_name):
        classes = [n for n, v in vars(module).items()
                   if isinstance(v, type) and issubclass(v, Task) and v is not Task and v.__module__ == module_name]
        raise CircuitkitError(f"task file {str(file)!r} has no class {cls_name!r}; Task subclasses there: "
                              f"{choices_hint(classes) if classes else 'none'}")
    return _instantiate(getattr(module, cls_name), f"{file}:{cls_name}")


def _load_module_class(module_name: str, cls_name: str, spec: str) -> Task:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise CircuitkitError(f"task spec {spec!r}: module {module_name!r} cannot be imported ({e}); "
                              f"valid forms: {SPEC_FORMS}") from None
    except Exception as e:  # noqa: BLE001
        raise CircuitkitError(f"importing {module_name!r} for task {spec!r} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, cls_name):
        raise CircuitkitError(f"module {module_name!r} has no class {cls_name!r} (task spec {spec!r})")
    return _instantiate(getattr(module, cls_name), spec)


def load_task(spec: str, base_dir: str | Path | None = None, model_dir: str | Path | None = None) -> Task:
    """The Task a spec *the user named* designates (see the module docstring): a task file named here runs
    and joins the user's allowlist.  ``base_dir`` anchors a relative file path (a case toml passes its own
    folder); ``model_dir`` is the checkpoint whose tokenizer a prompt-pairs task (``prompt_pairs:FILE.jsonl``)
    uses.  Every failure is a CircuitkitError naming the valid forms.  Specs read from artefacts go through
    ``task_from_record`` instead."""
    return _resolve(spec, base_dir, model_dir, _trust_named)


def _load_named(spec: str) -> Task | None:
    """A built-in or installed task by bare name, else None."""
    if spec in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec]()
        task.spec = spec
        return task
    installed = installed_tasks()
    if spec in installed:
        try:
            cls = installed[spec].load()
        except Exception as e:  # noqa: BLE001
            raise CircuitkitError(f"installed task {spec!r} ({installed[spec].value}) failed to load: "
                                  f"{type(e).__name__}: {e}") from None
        return _instantiate(cls, spec)  # it records the spec
    return None


def _resolve(spec: str, base_dir: str | Path | None, model_dir: str | Path | None, check: FileCheck) -> Task:
    if not isinstance(spec, str) or not spec.strip():
        raise CircuitkitError(f"empty task spec; valid: {choices_hint(task_names())} or {SPEC_FORMS}")
    spec = spec.strip()
    if spec.startswith(PROMPT_PAIRS):
        from circuitkit.tasks.prompt_pairs import PromptPairsTask

        file = Path(spec[len(PROMPT_PAIRS):]).expanduser()
        if not file.is_absolute() and base_dir is not None:
            file = Path(base_dir) / file
        if model_dir is None:
            raise CircuitkitError(f"task {spec!r} tokenizes with the model's own tokenizer: name it on a verb that "
                                  "loads a model (--task), or in a case whose [model] path is set")
        return PromptPairsTask(file, model_dir)
    if spec.startswith(TRACR):
        return _tracr_task(spec, base_dir, model_dir)
    if ":" not in spec and spec.endswith(".py"):
        raise CircuitkitError(f"task spec {spec!r} names a file but no class: write {spec}:ClassName")
    if ":" not in spec:
        task = _load_named(spec)
        if task is None:
            raise CircuitkitError(f"unknown task {spec!r}; valid tasks: {choices_hint(task_names())}, "
                                  f"or a class: path/to/file.py:Class or package.module:Class")
        return task
    target, cls_name = _split_spec(spec)
    if _is_file_target(target):
        file = Path(target).expanduser()
        if not file.is_absolute() and base_dir is not None:
            file = Path(base_dir) / file
        return _load_file_class(file.resolve(), cls_name, spec, check)
    return _load_module_class(target, cls_name, spec)


def _tracr_task(spec: str, base_dir: str | Path | None, model_dir: str | Path | None,
                recorded_sha256: Any = None, where: str = "") -> Task:
    """The task a ``tracr:`` spec names (``tasks/tracr.py``: a JSON spec, read as data); with ``recorded_sha256``
    (an artefact's record) its ``task.json`` must still be the one the artefact was made for."""
    from circuitkit.tasks.tracr import TracrTask, task_dir

    task = TracrTask(task_dir(spec, base_dir, model_dir))
    if isinstance(recorded_sha256, str) and recorded_sha256 and recorded_sha256 != task.sha256:
        raise CircuitkitError(f"{where!r} was made for another tracr task than the one in {str(task.directory)!r} "
                              f"(task.json sha256 {recorded_sha256[:12]}... then, {task.sha256[:12]}... now); rerun "
                              "the step that wrote it on this model")
    return task


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def task_record(task: Task) -> dict[str, Any]:
    """What an artefact stores to reload ``task`` later: its spec, and a task file's sha256."""
    spec = getattr(task, "spec", None) or task.name
    if spec.startswith(TRACR):  # the task is data in the model's directory: found again from the model, wherever it lies
        return {"spec": TRACR, "task_sha256": getattr(task, "sha256", "")}
    record: dict[str, Any] = {"spec": spec}
    if ":" in spec and not spec.startswith(PROMPT_PAIRS):
        target, _ = _split_spec(spec)
        if _is_file_target(target):
            record["file_sha256"] = file_sha256(Path(target))
    return record


def task_identity(task: Task) -> dict[str, Any]:
    """What makes two tasks the same for a cache key: a task file's content and class (not where the file
    lies, so a moved case folder keeps its caches), else the spec."""
    record = task_record(task)
    if record["spec"] == TRACR:
        return {"tracr_task_sha256": record["task_sha256"]}
    if "file_sha256" in record:
        return {"class": record["spec"].rpartition(":")[2], "file_sha256": record["file_sha256"]}
    if record["spec"].startswith(PROMPT_PAIRS):
        return {"prompt_pairs_sha256": file_sha256(Path(record["spec"][len(PROMPT_PAIRS):]))}
    return record


def check_same_task(meta: dict[str, Any], task: Task, where: str) -> None:
    """An artefact (hypotheses, verification) made for another task than ``task`` is refused by name: its sites
    and features would mean something else.  Compares the recorded reference when the artefact has one (a task
    file by class and content, wherever it lies now), else the bare name."""
    mine = task_record(task)
    ref = meta.get("task_ref") if isinstance(meta.get("task_ref"), dict) else None

    def identity(record: dict[str, Any]) -> tuple:
        spec = str(record.get("spec", ""))
        if record.get("task_sha256"):  # a tracr task: its task.json's content
            return (TRACR, record["task_sha256"])
        return (spec.rpartition(":")[2], record["file_sha256"]) if record.get("file_sha256") else (spec,)

    if ref and ref.get("spec"):
        recorded, same = str(ref["spec"]), identity(ref) == identity(mine)
    else:
        recorded = str(meta.get("task", ""))
        same = recorded in ("", task.name)
    if not same:
        raise CircuitkitError(f"{where!r} was made for task {recorded!r}, but the model solves {mine['spec']!r}; "
                              "rerun the step that wrote it on this model")


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _recorded_named_task(name: str, where: str, hint: str) -> Task:
    """The built-in or installed task an artefact names by ``name`` (never a file or module), else an error."""
    task = _load_named(name)
    if task is None:
        raise CircuitkitError(f"{where!r} names task {name!r}, which is neither built in nor installed "
                              f"(valid: {choices_hint(task_names())}); {hint}")
    return task


def _recorded_module_task(target: str, cls_name: str, spec: str, where: str, inside: Path, hint: str) -> Task:
    """The task class of a module an artefact names, refused when the module resolves inside the artefact."""
    found = importlib.util.find_spec(target.split(".")[0]) if target.split(".")[0] else None
    origin = Path(found.origin).resolve() if found is not None and found.origin else None
    if origin is not None and _inside(origin, inside):
        raise CircuitkitError(f"{where!r} names task module {target!r}, which resolves inside itself ({origin}); "
                              f"circuitkit does not run code shipped with an artefact: {hint}")
    return _load_module_class(target, cls_name, spec)


def task_from_record(record: dict[str, Any] | None, name: str | None, where: str,
                     model_dir: str | Path | None = None) -> Task:
    """The task an artefact's metadata names (``record`` from ``task_record``, else the bare ``name``);
    ``where`` is the artefact, ``model_dir`` the checkpoint whose tokenizer a prompt-pairs task uses
    (default ``where``).

    Nothing an artefact says is taken as the user's word (module docstring): a task file must hold the
    content recorded for it, lie outside ``where``, and be on the user's allowlist or allowed by
    ``--trust-task``; a record without a hash is refused, never read as "nothing to check"."""
    hint = f"pass --task ({choices_hint(task_names())} or FILE.py:Class)"
    if not record or "spec" not in record:
        if not name:
            raise CircuitkitError(f"{where!r} does not say which task it solves; {hint}")
        return _recorded_named_task(str(name), where, hint)
    spec = str(record["spec"]).strip()
    inside = Path(where).resolve()
    if spec.startswith(PROMPT_PAIRS):  # data, not code
        from circuitkit.tasks.prompt_pairs import PromptPairsTask

        return PromptPairsTask(Path(spec[len(PROMPT_PAIRS):]).expanduser(), model_dir if model_dir is not None else where)
    if spec.startswith(TRACR):  # data, not code: tracr: alone is the model's own directory
        return _tracr_task(spec, None, model_dir if model_dir is not None else where, record.get("task_sha256"), where)
    if ":" not in spec:  # a built-in or installed name
        return _recorded_named_task(spec, where, hint)
    target, cls_name = _split_spec(spec)
    if not _is_file_target(target):
        return _recorded_module_task(target, cls_name, spec, where, inside, hint)
    sha = record.get("file_sha256")
    file = Path(target).expanduser().resolve()
    consent = ("circuitkit runs a task file an artefact names only once you have named that file yourself: "
               f"pass --task {file}:{cls_name} (which trusts it) or --trust-task")
    if not isinstance(sha, str) or not sha:
        raise CircuitkitError(f"{where!r} names the task file {str(file)!r} without its sha256, so its content "
                              f"cannot be checked; it is treated as untrusted; {consent}")
    if _inside(file, inside):
        raise CircuitkitError(f"{where!r} names a task file inside itself ({file}); circuitkit does not run "
                              f"code shipped with a checkpoint: {hint}")
    if not file.is_file():
        raise CircuitkitError(f"{where!r} was trained on the task in {str(file)!r}, which no longer exists; "
                              f"put the file back or {hint}")

    def check(path: Path, digest: str) -> None:
        if digest != sha:
            raise CircuitkitError(f"the task file {str(path)!r} changed since {where!r} was written (sha256 "
                                  f"{sha[:12]}... then); {hint}")
        if trust.recorded_files_trusted():
            trust.trust(path, digest)
        elif not trust.is_trusted(digest):
            raise CircuitkitError(f"{where!r} names the task file {str(path)!r}, which you have not named yourself "
                                  f"on this machine; {consent}")

    return _load_file_class(file, cls_name, spec, check)
