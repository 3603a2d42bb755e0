"""Built-in tasks and the registry that maps a name to a Task."""
from __future__ import annotations

from typing import Callable

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks.base import Feature, Target, Task, Tokenizer, Vocabulary


def _counting() -> Task:
    from circuitkit.tasks.counting import CountingTask

    return CountingTask()


def _addition() -> Task:
    from circuitkit.tasks.addition import AdditionTask

    return AdditionTask()


def _ioi() -> Task:
    from circuitkit.tasks.ioi import IOITask

    return IOITask()


TASKS: dict[str, Callable[[], Task]] = {"counting": _counting, "addition": _addition, "ioi": _ioi}


def get_task(name: str) -> Task:
    """The built-in task called ``name``; a clear error lists the valid names otherwise."""
    if name not in TASKS:
        raise CircuitkitError(f"unknown task {name!r}; valid tasks: {choices_hint(TASKS)}")
    return TASKS[name]()


__all__ = ["Feature", "Target", "Task", "Tokenizer", "Vocabulary", "TASKS", "get_task"]
