"""How many intra-op (torch) threads circuitkit uses: as many as the CPUs it may run on leave free.

Two threads on a two-core machine that another job shares oversubscribe it: every parallel region then waits for
its slowest thread, and a run takes twice as long (issue 33).  So, unless ``--threads`` says otherwise, a run
counts the CPUs it may use and takes those the other jobs leave free:

=================  ============================================================  ==============================
reading            from                                                          meaning
=================  ============================================================  ==============================
affinity           ``os.sched_getaffinity(0)``                                   CPUs this process may run on
quota              cgroup v2 ``cpu.max`` (v1 ``cpu.cfs_quota_us`` / period)      CPUs' worth of time allowed
busy               ``/proc/stat`` over ``WINDOW`` s on those CPUs, less this         CPUs other jobs keep busy now
                   process's own CPU time (elsewhere: the 1-minute load average)
=================  ============================================================  ==============================

threads = max(1, min(affinity, quota) − round(busy)).  The busy reading is taken between stages, while this run
computes nothing, so it sees only the others (a load average would lag by a minute and count this run's last
stage).  A long run re-reads it before each stage and lowers (or raises, up to the CPUs it may use) the count;
every choice and its readings go into the run's manifest.  Thread counts can change the order of floating-point
sums, so a bit-identical rerun passes ``--threads`` (the manifest says what each stage used).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

#: where cgroup v2 and v1 keep this process's CPU quota
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
PROC_STAT = Path("/proc/stat")
#: seconds over which the CPUs' busy time is read
WINDOW = 0.3


def affinity_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def quota_cpus(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> float | None:
    """CPUs' worth of time the cgroup allows (None: no quota, or none readable)."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = int(v1[0].read_text()), int(v1[1].read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def load_1min() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _cpu_times(cpus: set[int], stat: Path) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat`` (None: unreadable)."""
    busy = total = 0.0
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [float(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(v)
        busy += sum(v) - v[3] - v[4]
    return (busy, total) if total else None


def others_busy(window: float = WINDOW, stat: Path = PROC_STAT) -> tuple[float, str]:
    """(CPUs that other processes keep busy, how it was read): ``/proc/stat`` over ``window`` seconds on the CPUs
    this process may use, less this process's own CPU time; else the 1-minute load average."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    first, own0, t0 = _cpu_times(cpus, stat), os.times(), time.perf_counter()
    if first is None:
        return load_1min(), "load average"
    time.sleep(window)
    second, own1, dt = _cpu_times(cpus, stat), os.times(), time.perf_counter() - t0
    if second is None or second[1] <= first[1]:
        return load_1min(), "load average"
    share = (second[0] - first[0]) / (second[1] - first[1])  # busy share of the CPUs' time
    own = (own1.user - own0.user + own1.system - own0.system) / dt  # CPUs' worth this process used
    return max(0.0, share * len(cpus) - own), "/proc/stat"


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen and the readings behind it (written to the manifest)."""

    threads: int
    usable: int  # min(affinity, quota)
    affinity: int
    quota: float | None
    busy: float  # CPUs other jobs kept busy when chosen
    read_from: str  # "/proc/stat" or "load average"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threads(requested: int | None = None, affinity: int | None = None, quota: float | None | str = "read",
                   busy: float | None = None) -> ThreadChoice:
    """``requested`` (``--threads``) when given; else the usable CPUs less those other jobs keep busy (the module
    docstring); ``affinity``, ``quota`` and ``busy`` override the readings (tests)."""
    aff = affinity_cpus() if affinity is None else affinity
    q = quota_cpus() if quota == "read" else quota
    usable = max(1, min(aff, math.floor(q) if q is not None else aff))
    if requested:
        return ThreadChoice(requested, usable, aff, q, 0.0, "not read", "--threads")
    others, how = others_busy() if busy is None else (busy, "given")
    threads = max(1, usable - round(others))
    why = (f"{usable} usable CPU(s), other jobs keep about {others:.1f} busy" if others >= 0.5
           else f"{usable} usable CPU(s), idle")
    return ThreadChoice(threads, usable, aff, q, round(others, 2), how, why)


def apply(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op thread count to the choice."""
    torch.set_num_threads(choice.threads)
    return choice


__all__ = ["ThreadChoice", "affinity_cpus", "apply", "choose_threads", "load_1min", "others_busy", "quota_cpus"]
