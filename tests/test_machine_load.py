"""The benchmarks' load-average rule: a speed-up is withheld, with the reason, when another job shared the cores."""
from __future__ import annotations

import pytest

from circuitkit import machine_load
from circuitkit.machine_load import LOAD_SLACK, LoadWatch


def _watch(monkeypatch, before: float, after: float, threads: int = 2) -> LoadWatch:
    readings = iter([(before, 1.0, 1.0), (after, 1.5, 1.2)])
    monkeypatch.setattr(machine_load, "_load", lambda: next(readings))
    return LoadWatch(threads).stop()


@pytest.mark.parametrize("before,after,shared", [
    (0.3, 2.0, False),  # the run's own two threads
    (0.3, 2 + LOAD_SLACK, False),  # at the edge of the slack
    (0.3, 2 + LOAD_SLACK + 0.01, True),  # another job during the run
    (3.1, 2.0, True),  # another job before it
])
def test_a_run_is_shared_when_either_reading_exceeds_its_threads_and_the_slack(monkeypatch, before, after, shared):
    w = _watch(monkeypatch, before, after)
    assert w.shared is shared
    rec = w.record()
    assert rec["shared_machine"] is shared and rec["load_average_before"][0] == before
    assert rec["load_average_after"] == [after, 1.5, 1.2]
    if shared:
        assert f"{before:.2f} before" in rec["withheld"] and "no speed-up is stated" in rec["withheld"]
    else:
        assert rec["withheld"] is None and w.withheld("time") is None


def test_the_verdict_needs_the_reading_after_the_run(monkeypatch):
    monkeypatch.setattr(machine_load, "_load", lambda: (0.1, 0.1, 0.1))
    w = LoadWatch(2)
    with pytest.raises(RuntimeError, match="stop"):
        _ = w.shared
    with pytest.raises(RuntimeError, match="stop"):
        w.record()
    assert w.stop().record("idle-machine time")["load_rule"].startswith("no idle-machine time is stated")


def test_gemm_peak_is_a_rate_and_leaves_the_callers_threads_as_they_were():
    import torch

    before = torch.get_num_threads()
    rate = machine_load.gemm_peak(1, n=256, repeats=2)
    assert rate > 0.1 and torch.get_num_threads() == before  # GFLOP/s; no CPU this test runs on is slower
