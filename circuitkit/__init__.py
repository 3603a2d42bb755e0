"""circuitkit: InversionView decoders and causal circuit verification for transformers.

``import circuitkit as ck`` gives the workflow (``circuitkit.api``): ``ck.load_model``, ``ck.load_task``,
``ck.load_case``, ``ck.patch``, ``ck.sweep``, ``ck.train_decoder``, ``ck.load_decoder``, ``ck.invert``,
``ck.hypothesize``, ``ck.verify``, ``ck.build_circuit``, ``ck.run_case``.  They load lazily, so the command
line starts without importing torch for ``--help``.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from circuitkit.errors import CircuitkitError

_API = ("Circuit", "CaseRun", "build_circuit", "hypothesize", "invert", "load_case", "load_decoder", "load_model",
        "load_task", "patch", "run_case", "sweep", "train_decoder", "verify")


def __getattr__(name: str) -> Any:
    if name in _API:
        from circuitkit import api

        return getattr(api, name)
    if name == "Task":
        from circuitkit.tasks import Task

        return Task
    raise AttributeError(f"module 'circuitkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "Task"])


__all__ = ["CircuitkitError", "Task", "__version__", *_API]
