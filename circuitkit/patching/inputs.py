"""The inputs a patching experiment runs on: bases, their sources (given, or made by a contrast), and the
reference inputs of mean / resample ablation.  The CLI and the Python API share these choices."""
from __future__ import annotations

import random
from collections.abc import Sequence

from circuitkit.errors import CircuitkitError
from circuitkit.tasks.base import Task

#: how sources are made from bases when none are given: the paper's contrasts R and F
CONTRASTS = ("random", "minimal")


def bases_and_sources(task: Task, base: Sequence[str] | None, source: Sequence[str] | None, n: int,
                      contrast: str, seed: int, need_source: bool,
                      what: tuple[str, str] = ("base", "source")) -> tuple[list[str], list[str] | None]:
    """Base inputs (``base``, checked against the task's format, else ``n`` from the test split) and sources
    (``source``, checked likewise and one per base, else made by ``contrast``; none if not ``need_source``)."""
    from circuitkit.validate import check_range

    rng = random.Random(seed)
    if base:
        for i, t in enumerate(base):
            task.check_input(t, f"{what[0]} input {i + 1}")
        bases = list(base)
    else:
        test = list(task.split("test"))
        check_range("--n", n, 1, len(test), hint=f" (the {task.name} test split has {len(test)} inputs)")
        bases = rng.sample(test, n)
    if source is not None:
        if len(source) != len(bases):
            raise CircuitkitError(f"{len(bases)} base inputs but {len(source)} sources; give one source per base")
        for i, t in enumerate(source):
            task.check_input(t, f"{what[1]} input {i + 1}")
        return bases, list(source)
    if not need_source:
        return bases, None
    if contrast not in CONTRASTS:
        raise CircuitkitError(f"unknown contrast {contrast!r}; valid: {', '.join(CONTRASTS)}")
    make = task.contrast_minimal if contrast == "minimal" else task.contrast_random
    try:
        return bases, [make(t, rng) for t in bases]
    except ValueError as e:
        raise CircuitkitError(f"cannot make a {contrast} contrast: {e}") from None


def reference_inputs(task: Task, n_bases: int, ablation: str, seed: int) -> list[str] | None:
    """Inputs whose activations mean / resample ablation draws on (at least 200); None for other ablations."""
    if ablation not in ("mean", "resample"):
        return None
    return random.Random(seed + 1).sample(list(task.split("test")), max(n_bases, 200))
