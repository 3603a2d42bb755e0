"""The thread count a run picks (``circuitkit/threads.py``): the CPUs it may use less those other jobs keep busy,
read from the cgroup quota and /proc/stat, with ``--threads`` overriding."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from circuitkit.threads import _cpu_times, choose_threads, others_busy, quota_cpus


def test_the_quota_is_read_from_cgroup_v2_then_v1(tmp_path):
    v2, q1, p1 = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    v2.write_text("150000 100000\n")
    assert quota_cpus(v2, (q1, p1)) == 1.5
    v2.write_text("max 100000\n")
    assert quota_cpus(v2, (q1, p1)) is None
    v2.unlink()
    q1.write_text("300000\n"), p1.write_text("100000\n")
    assert quota_cpus(v2, (q1, p1)) == 3.0
    q1.write_text("-1\n")
    assert quota_cpus(v2, (q1, p1)) is None


def test_busy_time_counts_only_the_cpus_this_process_may_use(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  30 0 10 60 0 0 0 0 0 0\n"
                    "cpu0 20 0 5 25 0 0 0 0 0 0\n"
                    "cpu1 10 0 5 35 0 0 0 0 0 0\n"
                    "intr 1 2 3\n")
    assert _cpu_times({0, 1}, stat) == (40.0, 100.0)
    assert _cpu_times({1}, stat) == (15.0, 50.0)
    assert _cpu_times({0}, tmp_path / "missing") is None


def test_the_choice_leaves_the_busy_cpus_to_the_other_jobs():
    assert choose_threads(affinity=2, quota=None, busy=0.1).threads == 2
    one = choose_threads(affinity=2, quota=None, busy=1.1)
    assert one.threads == 1 and "keep about 1.1 busy" in one.reason
    assert choose_threads(affinity=8, quota=2.5, busy=0.0).threads == 2  # the quota bounds it
    assert choose_threads(affinity=2, quota=None, busy=5.0).threads == 1  # never below one
    forced = choose_threads(4, affinity=2, quota=None, busy=2.0)
    assert forced.threads == 4 and forced.reason == "--threads"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_beside_the_run_is_seen():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        seen, how = others_busy(window=1.0)
    finally:
        busy.kill()
        busy.wait()
    assert how == "/proc/stat" and seen >= 0.7  # one CPU's worth (plus whatever else the machine runs)
