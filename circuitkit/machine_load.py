"""The load-average rule every circuitkit benchmark applies before it states a speed-up or a time, and the
machine's matrix-multiply rate (``gemm_peak``), which says how fast the machine was when a time was taken.

A benchmark records the 1-minute load average before and after its timed work.  Its own threads hold
the load at about their number, so when either reading exceeds ``threads + LOAD_SLACK`` another job
shared the cores: a loaded machine slows some code more than other code, so the run states no speed-up
and no met time target, and says why.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

#: load above the benchmark's own threads that short-lived processes (a shell, the interpreter) can add
LOAD_SLACK = 0.5


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass
class LoadWatch:
    """Load averages (1, 5, 15 minutes) around a benchmark's timed work on ``threads`` threads."""

    threads: int
    before: tuple[float, float, float] = field(default_factory=lambda: _load())  # read when the watch starts
    after: tuple[float, float, float] | None = None

    def stop(self) -> LoadWatch:
        """Read the load after the timed work (call once it is done)."""
        self.after = _load()
        return self

    @property
    def shared(self) -> bool:
        """Whether another job shared the cores (judged on the 1-minute averages before and after)."""
        if self.after is None:
            raise RuntimeError("LoadWatch.stop() was not called")
        return max(self.before[0], self.after[0]) > self.threads + LOAD_SLACK

    def withheld(self, what: str = "speed-up") -> str | None:
        """Why ``what`` is not stated from this run, or None when the machine was idle."""
        if not self.shared:
            return None
        assert self.after is not None
        return (f"the 1-minute load average ({self.before[0]:.2f} before, {self.after[0]:.2f} after) exceeded "
                f"{self.threads} threads + {LOAD_SLACK}: another job shared the cores, so no {what} is stated")

    def record(self, what: str = "speed-up") -> dict:
        """The JSON fields every benchmark writes: both readings, the rule, the verdict and its reason."""
        if self.after is None:
            raise RuntimeError("LoadWatch.stop() was not called")
        return {"load_average_before": [round(x, 2) for x in self.before],
                "load_average_after": [round(x, 2) for x in self.after],
                "load_rule": f"no {what} is stated when the 1-minute load average before or after the run exceeds "
                             f"the {self.threads} threads + {LOAD_SLACK}",
                "shared_machine": self.shared, "withheld": self.withheld(what)}


def gemm_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate in GFLOP/s on ``threads`` threads (best of ``repeats`` n x n x n
    products): the ceiling for any work made of matmuls, and the yardstick for comparing times taken on days when
    the same machine runs at different speeds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up (allocation, thread pool)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best / 1e9
