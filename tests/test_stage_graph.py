"""The case study as a stage graph: declared needs give the order and the cache keys; the task is built once."""
from __future__ import annotations

import pytest

from circuitkit.pipeline.outputs import CaseResults
from circuitkit.pipeline.run import STAGES
from circuitkit.pipeline.stages import Stage, StageRunner, stage_key, stage_order


def _noop(ctx, runner):
    return None


def test_the_case_study_order_runs_every_stage_after_what_it_needs():
    order = [s.name for s in stage_order(STAGES)]
    assert set(order) == {s.name for s in STAGES} == set(CaseResults.stage_names())
    for s in STAGES:
        assert all(order.index(n) < order.index(s.name) for n in s.needs), s


def test_order_follows_needs_not_the_listing_and_names_bad_graphs():
    listed = [Stage("report", ("fit",), _noop), Stage("fit", ("data",), _noop), Stage("data", (), _noop)]
    assert [s.name for s in stage_order(listed)] == ["data", "fit", "report"]
    assert [s.name for s in stage_order(STAGES)] == [s.name for s in STAGES]  # already in order: kept as listed
    with pytest.raises(ValueError, match="needs unknown stage.*'nope'"):
        stage_order([Stage("a", ("nope",), _noop)])
    with pytest.raises(ValueError, match="round a circle"):
        stage_order([Stage("a", ("b",), _noop), Stage("b", ("a",), _noop)])


def test_a_stage_key_includes_the_keys_of_the_stages_it_needs(tmp_path):
    runner = StageRunner(tmp_path, log=lambda m: None, needs={"fit": ("data",)})
    runner.run("data", {"n": 1}, lambda d: {"rows": 1})
    runner.run("fit", {"lr": 0.1}, lambda d: {"loss": 0.5})
    assert runner.keys["fit"] == stage_key({"lr": 0.1}, [runner.keys["data"]])
    other = StageRunner(tmp_path / "other", log=lambda m: None, needs={"fit": ("data",)})
    other.run("data", {"n": 2}, lambda d: {"rows": 2})  # other data: the fit must not be reused
    other.run("fit", {"lr": 0.1}, lambda d: {"loss": 0.7})
    assert other.keys["fit"] != runner.keys["fit"]


def test_case_results_are_typed_by_stage():
    r = CaseResults()
    r.set("screen", {"kept": ["a1.0@:"], "rows": []})
    assert r.screen["kept"] == ["a1.0@:"] and r.to_dict() == {"screen": {"kept": ["a1.0@:"], "rows": []}}
    with pytest.raises(KeyError, match="no stage 'scren'.*screen"):
        r.set("scren", {})


def test_the_case_task_is_built_once(monkeypatch):
    """Validation (both settings of --quick) and the run share one task object."""
    import circuitkit.tasks.registry as registry
    from circuitkit.pipeline.config import load_case

    built = []
    real = registry.load_task
    monkeypatch.setattr(registry, "load_task", lambda *a, **k: built.append(a) or real(*a, **k))
    cfg = load_case("counting", quick=True)
    task = cfg.load_task()
    assert cfg.load_task() is task and len(built) == 1
    assert "_task" not in cfg.to_dict()
