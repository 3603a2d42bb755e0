"""Finding a Task by its spec: a built-in name, ``path/to/file.py:Class``, ``package.module:Class``,
or a name an installed package registers under the ``circuitkit.tasks`` entry-point group.

A checkpoint records the spec of its task (``task_record``), so later verbs reload a user's task
with no flag.  A task file recorded in a checkpoint is imported only if it still has the content it
had at training time (sha256) and does not live inside a directory the loader was handed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks.base import Task

#: entry-point group an installed package uses to register tasks: ``name = "pkg.module:Class"``
ENTRY_POINT_GROUP = "circuitkit.tasks"

SPEC_FORMS = ("a built-in name, path/to/file.py:Class, package.module:Class, prompt_pairs:FILE.jsonl or an "
              "installed task name")
#: the spec prefix of the prompt-pairs task (``tasks/prompt_pairs.py``)
PROMPT_PAIRS = "prompt_pairs:"


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


def _load_file_class(file: Path, cls_name: str, spec: str) -> Task:
    if not file.is_file():
        raise CircuitkitError(f"task file {str(file)!r} does not exist (from task spec {spec!r})")
    if file.suffix != ".py":
        raise CircuitkitError(f"task file {str(file)!r} is not a .py file (from task spec {spec!r})")
    digest = file_sha256(file)
    module_name = f"circuitkit_user_task_{digest[:16]}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, file)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up by module name
        try:
            loader_spec.loader.exec_module(module)
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
    """The Task a spec names (see the module docstring); ``base_dir`` anchors a relative file path
    (a case toml passes its own folder); ``model_dir`` is the checkpoint whose tokenizer a prompt-pairs
    task (``prompt_pairs:FILE.jsonl``) uses.  Every failure is a CircuitkitError naming the valid forms."""
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
    if spec in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec]()
        task.spec = spec
        return task
    if ":" not in spec and spec.endswith(".py"):
        raise CircuitkitError(f"task spec {spec!r} names a file but no class: write {spec}:ClassName")
    if ":" not in spec:
        installed = installed_tasks()
        if spec in installed:
            try:
                cls = installed[spec].load()
            except Exception as e:  # noqa: BLE001
                raise CircuitkitError(f"installed task {spec!r} ({installed[spec].value}) failed to load: "
                                      f"{type(e).__name__}: {e}") from None
            return _instantiate(cls, spec)  # it records the spec
        raise CircuitkitError(f"unknown task {spec!r}; valid tasks: {choices_hint(task_names())}, "
                              f"or a class: path/to/file.py:Class or package.module:Class")
    target, cls_name = _split_spec(spec)
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target).expanduser()
        if not file.is_absolute() and base_dir is not None:
            file = Path(base_dir) / file
        return _load_file_class(file.resolve(), cls_name, spec)
    return _load_module_class(target, cls_name, spec)


def task_record(task: Task) -> dict[str, Any]:
    """What a checkpoint stores to reload ``task`` later: its spec, and a task file's sha256."""
    spec = getattr(task, "spec", None) or task.name
    record: dict[str, Any] = {"spec": spec}
    if ":" in spec and not spec.startswith(PROMPT_PAIRS):
        target, _ = _split_spec(spec)
        if target.endswith(".py") or "/" in target:
            record["file_sha256"] = file_sha256(Path(target))
    return record


def task_from_record(record: dict[str, Any] | None, name: str | None, where: str) -> Task:
    """The task a checkpoint's metadata names (``record`` from ``task_record``, else the bare name).

    A task file must exist, hold the content it had when the checkpoint was written, and lie outside
    the checkpoint (``where``): a directory someone hands you cannot make circuitkit run code it ships."""
    hint = f"pass --task ({choices_hint(task_names())} or FILE.py:Class)"
    if not record or "spec" not in record:
        if not name:
            raise CircuitkitError(f"{where!r} does not say which task it solves; {hint}")
        return load_task(name)
    spec = str(record["spec"])
    sha = record.get("file_sha256")
    if sha is not None:
        target, _ = _split_spec(spec)
        file = Path(target).resolve()
        inside = Path(where).resolve()
        if file == inside or inside in file.parents:
            raise CircuitkitError(f"{where!r} names a task file inside itself ({file}); circuitkit does not run "
                                  f"code shipped with a checkpoint: {hint}")
        if not file.is_file():
            raise CircuitkitError(f"{where!r} was trained on the task in {str(file)!r}, which no longer exists; "
                                  f"put the file back or {hint}")
        if file_sha256(file) != sha:
            raise CircuitkitError(f"the task file {str(file)!r} changed since {where!r} was written (sha256 "
                                  f"{sha[:12]}... then); {hint}")
    return load_task(spec, model_dir=where)
