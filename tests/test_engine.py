"""The intervention engine (``circuitkit.patching.engine``) and the runner's one copy of the attention maths."""
from __future__ import annotations

import pytest
import torch

from circuitkit.patching import engine
from circuitkit.patching.engine import Blend, Patch, Record
from circuitkit.patching.node import resid_by_layer, resid_names
from circuitkit.sites import parse_site


@pytest.fixture(scope="module")
def ids(tiny_counting_model):
    return tiny_counting_model.task.encode(["Babcab|a:2E", "Bcacbb|b:3E", "Bccab|c:2E"])


@torch.no_grad()
def test_start_from_supplied_residual_equals_a_full_run(tiny_counting_model, ids):
    """A patch in block 1 run from the base's residual stream entering block 1 gives the full run's logits."""
    pm = tiny_counting_model
    _, cache = pm.runner.run(ids, cache=resid_names(pm.n_layers))
    site = parse_site("a1.0")
    value = torch.randn(ids.shape[0], ids.shape[1], pm.runner.d_model)
    patch = Patch(site, None, value)
    assert engine.start_layer([patch], resid_by_layer(cache)) == 1
    full = engine.run(pm.runner, ids, [patch])
    fast = engine.run(pm.runner, ids, [patch], resid=resid_by_layer(cache))
    assert torch.allclose(full, fast, atol=1e-5)
    plain = pm.runner.logits(ids)
    assert not torch.allclose(full, plain, atol=1e-3)  # the patch did change the output


@torch.no_grad()
def test_interventions_on_one_hook_apply_in_order_and_record_sees_the_result(tiny_counting_model, ids):
    pm = tiny_counting_model
    hook = "blocks.0.hook_mlp_out"
    b, n, d = ids.shape[0], ids.shape[1], pm.runner.d_model
    first, second = torch.ones(b, n, d), torch.full((b, n, d), 2.0)
    take_row = torch.zeros(b, n, 1, dtype=torch.bool)
    take_row[:, 2] = True
    seen: dict = {}
    engine.run(pm.runner, ids, [Blend(hook, torch.ones((), dtype=torch.bool), first), Blend(hook, take_row, second),
                                Record([hook], seen)], stop_at_layer=1)
    got = seen[hook]
    assert torch.all(got[:, 2] == 2.0) and torch.all(got[:, [0, 1, 3]] == 1.0)
    assert engine.run(pm.runner, ids, [Record([hook], {})], stop_at_layer=1) is None


@torch.no_grad()
def test_metric_and_errors(tiny_counting_model, ids):
    pm = tiny_counting_model
    vals = engine.run(pm.runner, ids, metric=lambda logits: logits[:, -1].max(-1).values)
    assert vals.shape == (ids.shape[0],)
    with pytest.raises(ValueError, match="residual stream entering block 1"):
        engine.run(pm.runner, ids, start_at_layer=1)
    with pytest.raises(ValueError, match="cannot apply to a batch"):
        engine.run(pm.runner, ids, [Patch(parse_site("m0"), None, torch.zeros(1, ids.shape[1], pm.runner.d_model))])


@torch.no_grad()
def test_row_attention_equals_the_full_pattern(tiny_counting_model, ids):
    """``attend_row`` (one query row per example, as sweeps and circuit evaluation use it) reproduces the full
    forward's z at that row, and ``block_at_rows`` its resid_post: the causal mask is the same one."""
    pm, r = tiny_counting_model, tiny_counting_model.runner
    _, c = r.run(ids, cache=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"])
    x = c["blocks.1.hook_resid_pre"]
    rows = torch.arange(ids.shape[0])
    for t_val in (0, 3, ids.shape[1] - 1):
        t = torch.full((ids.shape[0],), t_val)
        h1 = r.norm1(1, x)
        k, v = r.keys_values(1, h1, torch.arange(ids.shape[1]))
        z = r.attend_row(r.query_at(1, h1[rows, t], t), k, v, t)
        assert torch.allclose(z, c["blocks.1.attn.hook_z"][rows, t], atol=1e-5)
        assert torch.allclose(r.block_at_rows(1, x, t), c["blocks.1.hook_resid_post"][rows, t], atol=1e-5)
    assert pm.n_layers == 2
