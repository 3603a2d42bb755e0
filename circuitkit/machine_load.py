"""The load-average rule every circuitkit benchmark applies before it states a speed-up or a time.

A benchmark records the 1-minute load average before and after its timed work.  Its own threads hold
the load at about their number, so when either reading exceeds ``threads + LOAD_SLACK`` another job
shared the cores: a loaded machine slows some code more than other code, so the run states no speed-up
and no met time target, and says why.
"""
from __future__ import annotations

import os
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
