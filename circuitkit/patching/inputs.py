"""The inputs a patching experiment runs on: bases, their sources (given, or made by a contrast), and the
reference inputs of mean / resample ablation.  The CLI and the Python API share these choices."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from circuitkit.errors import CircuitkitError
from circuitkit.tasks.base import CONTRASTS, Task

#: makes one source for a base (None, or a CircuitkitError / ValueError, when the base admits none)
SourceMaker = Callable[[str, random.Random], "str | None"]


def paired_inputs(task: Task, make_source: SourceMaker, n: int, rng: random.Random,
                  oversample: int = 20) -> tuple[list[str], list[str]]:
    """Up to ``n`` test-split bases, each with the one source ``make_source`` gives it.  Candidates are drawn
    without replacement (``oversample`` × n of them); a base that admits no source is skipped."""
    test = list(task.split("test"))
    bases: list[str] = []
    sources: list[str] = []
    for base in rng.sample(test, min(len(test), oversample * n)):
        try:
            source = make_source(base, rng)
        except (CircuitkitError, ValueError):
            continue
        if source is not None:
            bases.append(base)
            sources.append(source)
        if len(bases) == n:
            break
    return bases, sources


def bases_and_sources(task: Task, base: Sequence[str] | None, source: Sequence[str] | None, n: int,
                      contrast: str, seed: int, need_source: bool,
                      what: tuple[str, str] = ("base", "source")) -> tuple[list[str], list[str] | None]:
    """Base inputs (``base``, checked against the task's format, else ``n`` from the test split) and sources
    (``source``, checked likewise and one per base, else made by ``contrast``; none if not ``need_source``)."""
    from circuitkit.validate import check_range

    rng = random.Random(seed)
    make = lambda text, r: task.contrast(text, contrast, r)  # noqa: E731
    if need_source and source is None and contrast not in CONTRASTS:
        raise CircuitkitError(f"unknown contrast {contrast!r}; valid: {', '.join(CONTRASTS)}")
    if base:
        for i, t in enumerate(base):
            task.check_input(t, f"{what[0]} input {i + 1}")
        bases = list(base)
    else:
        test = list(task.split("test"))
        check_range("--n", n, 1, len(test), hint=f" (the {task.name} test split has {len(test)} inputs)")
        if need_source and source is None:
            bases, sources = paired_inputs(task, make, n, rng, oversample=1)
            if len(bases) < n:
                raise CircuitkitError(f"cannot make a {contrast} contrast for {n - len(bases)} of the {n} sampled "
                                      "inputs; give sources or use another contrast")
            return bases, sources
        bases = rng.sample(test, n)
    if source is not None:
        if len(source) != len(bases):
            raise CircuitkitError(f"{len(bases)} base inputs but {len(source)} sources; give one source per base")
        for i, t in enumerate(source):
            task.check_input(t, f"{what[1]} input {i + 1}")
        return bases, list(source)
    if not need_source:
        return bases, None
    try:
        return bases, [make(t, rng) for t in bases]
    except ValueError as e:
        raise CircuitkitError(f"cannot make a {contrast} contrast: {e}") from None


def reference_inputs(task: Task, n_bases: int, ablation: str, seed: int) -> list[str] | None:
    """Inputs whose activations mean / resample ablation draws on (at least 200); None for other ablations."""
    if ablation not in ("mean", "resample"):
        return None
    return random.Random(seed + 1).sample(list(task.split("test")), max(n_bases, 200))
