"""Cumulative group patching and the counting-table reproduction (structure and consistency)."""
from __future__ import annotations

import json

import pytest
import torch

from circuitkit.errors import CircuitkitError
from circuitkit.paper.counting_table import (
    PAPER,
    contrast_pairs,
    counting_table,
    paper_groups,
    to_markdown,
    write_table,
)
from circuitkit.patching.groups import Group, cumulative_patch
from circuitkit.patching.node import patch_nodes


@pytest.fixture(scope="module")
def table(tiny_counting_model):
    return counting_table(tiny_counting_model, n=48, seed=1)


def test_counting_table_structure_and_consistency(tiny_counting_model, table, tmp_path):
    pm = tiny_counting_model
    for c in ("R", "F"):
        r = table[c]
        fwd, bwd = r.decreases("forward"), r.decreases("backward")
        assert len(fwd) == len(bwd) == 4
        assert [s.groups for s in r.steps if s.order == "forward"][-1] == [g.name for g in paper_groups()]
        assert abs(fwd[-1] - bwd[-1]) < 1e-4  # both orders end with every group patched
        base, src = contrast_pairs(pm, c, 48, seed=1)
        alone = patch_nodes(pm, base, ["a1.0@:"], source=src, metric="logit_diff", target="count")
        assert torch.allclose(r.steps[4].patched, alone.patched, atol=1e-4)  # backward step 1 = a1.0@: alone
    # F keeps the length, so positional embeddings are identical: patching them changes nothing
    assert table["F"].decreases("forward")[0] == 0.0
    base, src = contrast_pairs(pm, "R", 48, seed=1)
    assert any(s.index("|") != b.index("|") for b, s in zip(base, src))  # R really mixes lengths
    assert all(3 < b.index("|") - 1 < 27 for b in base)
    assert all(b[b.index(":") + 1] != s[s.index(":") + 1] for b, s in zip(base, src))
    print(to_markdown(table, "tiny fixture model (briefly trained; not the paper's numbers)"))  # pytest -s shows it
    data = write_table(table, tmp_path)
    md = (tmp_path / "counting_patch_table.md").read_text()
    assert "| R |" in md and "| F |" in md and f"({PAPER['R']['clean']:.2f})" in md
    stored = json.loads((tmp_path / "counting_patch_table.json").read_text())
    assert stored["checks"]["F"]["forward_all_equals_backward_all"] is True
    assert stored["results"]["R"]["steps"][3]["decrease"]["mean"] == pytest.approx(data["results"]["R"]["steps"][3]
                                                                                  ["decrease"]["mean"])


def test_named_positions_align_different_lengths(tiny_counting_model):
    """pos@Q patched from a longer source takes the source's *own* Q position embedding."""
    pm = tiny_counting_model
    base, src = ["Babcab|a:2E"], ["Babcabcabc|b:3E"]
    r = patch_nodes(pm, base, ["pos@Q"], source=src, metric="logit_diff", target="count")
    # equivalent explicit patch: base's Q is position 7, source's Q is position 11
    ids = pm.task.encode(base)

    def hook(act):
        act = act.clone()
        act[:, 7] = pm.runner.W_pos[11]
        return act
    with torch.no_grad():
        logits, _ = pm.runner.run(ids, hooks={"hook_pos_embed": hook})
    from circuitkit.patching.metrics import evaluate
    assert torch.allclose(r.patched, evaluate("logit_diff", logits, r.context)[0], atol=1e-5)


def test_group_errors(tiny_counting_model, tiny_addition_model):
    pm = tiny_counting_model
    with pytest.raises(CircuitkitError, match="at least one group"):
        cumulative_patch(pm, ["Babcab|a:2E"], ["Babcab|b:2E"], [])
    with pytest.raises(CircuitkitError, match="unknown order"):
        cumulative_patch(pm, ["Babcab|a:2E"], ["Babcab|b:2E"], [Group.parse("g", ["a1.0@:"])], orders=["sideways"])
    with pytest.raises(CircuitkitError, match="counting model"):
        contrast_pairs(tiny_addition_model, "R", 4)
    with pytest.raises(CircuitkitError, match="unknown contrast"):
        contrast_pairs(pm, "X", 4)


def test_generic_table_names_the_task_groups_not_the_counting_papers(tiny_addition_model):
    """Any task's cumulative patching renders with its own groups and every step's CI (no counting labels)."""
    import random

    from circuitkit.patching.groups import to_markdown as generic_markdown

    pm = tiny_addition_model
    rng = random.Random(0)
    bases = list(pm.task.split("test"))[:16]
    sources = [pm.task.contrast_random(b, rng) for b in bases]
    groups = [Group.parse("L0@A1", ["a0.0@A1", "a0.1@A1"]), Group.parse("L1@A1", ["a1.0@A1", "a1.1@A1"]),
              Group.parse("L1@=", ["a1.2@=", "a1.3@="])]
    res = cumulative_patch(pm, bases, sources, groups, target="A2")
    md = generic_markdown({"R": res}, "addition")
    assert "1 = L0@A1 · 2 = L1@A1 · 3 = L1@=" in md
    assert "forward (1 · 1+2 · all)" in md and "backward (3 · 3+2 · all)" in md
    rows = [row for row in md.splitlines() if row.startswith("| R |")]
    assert len(rows) == 2 and all(row.count("[") == 1 + len(groups) for row in rows)  # clean + one CI per step
    assert "a1.0 at `:`" not in md and "pos@Q" not in md
