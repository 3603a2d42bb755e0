"""Tasks, and the registry that finds one by name, file or module (see ``registry``)."""
from __future__ import annotations

from circuitkit.tasks.base import CharTokenizer, Feature, Target, Task, Tokenizer, Tokens, Vocabulary, WordTokenizer
from circuitkit.tasks.registry import BUILTIN_TASKS, load_task, task_names

#: the built-in tasks by name (kept for callers that list them)
TASKS = BUILTIN_TASKS


def get_task(spec: str) -> Task:
    """The task ``spec`` names: a built-in or installed name, ``file.py:Class`` or ``module:Class``."""
    return load_task(spec)


__all__ = ["CharTokenizer", "Feature", "Target", "Task", "Tokenizer", "Tokens", "Vocabulary", "WordTokenizer", "TASKS", "get_task", "load_task", "task_names"]
