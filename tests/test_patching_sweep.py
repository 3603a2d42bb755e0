"""Batched sweeps must equal TransformerLens's own get_act_patch_* functions (|Δ| <= 1e-4)."""
from __future__ import annotations

import random

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

from circuitkit.errors import CircuitkitError
from circuitkit.patching.metrics import evaluate
from circuitkit.patching.sweep import ROW_DIRECT, SWEEP_KINDS, sweep
from tests.random_models import SHAPES, random_model

TL_FUNCS = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "resid_mid": tlp.get_act_patch_resid_mid,
    "attn_out": tlp.get_act_patch_attn_out,
    "mlp_out": tlp.get_act_patch_mlp_out,
    "head": tlp.get_act_patch_attn_head_out_by_pos,
    "q": tlp.get_act_patch_attn_head_q_by_pos,
    "k": tlp.get_act_patch_attn_head_k_by_pos,
    "v": tlp.get_act_patch_attn_head_v_by_pos,
    "pattern": tlp.get_act_patch_attn_head_pattern_by_pos,
}


@pytest.fixture(scope="module")
def setup(tiny_addition_model):
    pm = tiny_addition_model
    task = pm.task
    rng = random.Random(3)
    base = task.generate(rng, 6)
    src = [task.contrast_minimal(t, rng) for t in base[:3]] + task.generate(rng, 3)
    # random sources must have the base's length for raw positions: regenerate until they match
    for i in range(3, 6):
        while len(src[i]) != len(base[i]):
            src[i] = task.generate(rng, 1)[0]
    bridge = pm.bridge()
    bridge.set_use_attn_result(True)
    bids, sids = task.encode(base), task.encode(src)
    with torch.no_grad():
        _, src_cache = bridge.run_with_cache(sids)
    return pm, bridge, base, src, bids, src_cache


METRIC, TARGET = "logit", "A3"  # read late (position 10) so that most cells can matter


def _cells(mean_shape, axes, n, n_layers, seed=0):
    """A sample of ``n`` cells covering every layer, at positions 1..10 (operands, '=', answer)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, k, (n,), generator=gen) for k in mean_shape], 1)
    idx[:, axes.index("layer")] = torch.arange(n) % n_layers
    pos_axis = axes.index("dest_pos" if "dest_pos" in axes else "pos")
    idx[:, pos_axis] = torch.randint(1, 11, (n,), generator=gen)
    return idx, pd.DataFrame(idx.numpy(), columns=list(axes))


def _tl_metric(ctx, per_example=False):
    def fn(logits):
        v = evaluate(METRIC, logits, ctx)[0]
        return v if per_example else v.mean()
    return fn


def test_head_sweep_equals_transformer_lens_per_example(setup):
    pm, bridge, base, src, bids, src_cache = setup
    ours = sweep(pm, base, "head", source=src, progress=False, metric=METRIC, target=TARGET)
    assert ours.values.shape == (pm.n_layers, bids.shape[1], pm.n_heads, len(base))
    idx, df = _cells(ours.values.shape[:-1], SWEEP_KINDS["head"][1], 16, pm.n_layers)
    with torch.no_grad():  # (the full sweep is compared in benchmarks/patching_sweep.py)
        tl = tlp.get_act_patch_attn_head_out_by_pos(bridge, bids, src_cache, _tl_metric(ours.context, True),
                                                    index_axis_names=None, index_df=df, reduce="none")
    ref = tl.values  # [cell, batch]
    mine = ours.values[tuple(idx.unbind(1))]
    assert ref.shape == mine.shape
    assert (ref - mine).abs().max() <= 1e-4
    # the sweep is not trivially the baseline: some cells move the logit difference
    assert (ours.values - ours.base).abs().max() > 1e-2
    assert (ref - ref[:, :1]).abs().max() > 0  # and examples differ


@pytest.mark.parametrize("kind", [k for k in TL_FUNCS if k != "head"])
def test_sweep_kinds_equal_transformer_lens(setup, kind):
    pm, bridge, base, src, bids, src_cache = setup
    ours = sweep(pm, base, kind, source=src, progress=False, metric=METRIC, target=TARGET)
    mean = ours.mean()
    idx, df = _cells(mean.shape, SWEEP_KINDS[kind][1], 6, pm.n_layers, seed=len(kind))
    tl_fn = TL_FUNCS[kind]
    with torch.no_grad():
        ref = tl_fn(bridge, bids, src_cache, _tl_metric(ours.context), index_axis_names=None, index_df=df)
    mine = mean[tuple(idx.unbind(1))]
    assert (ref - mine).abs().max() <= 1e-4, kind


def test_zero_ablation_equals_transformer_lens_with_zero_cache(setup):
    pm, bridge, base, src, bids, src_cache = setup
    ours = sweep(pm, base, "attn_out", ablation="zero", progress=False, metric="logit", target=TARGET)
    zeros = {f"blocks.{L}.hook_attn_out": torch.zeros_like(src_cache[f"blocks.{L}.hook_attn_out"])
             for L in range(pm.n_layers)}

    def metric(logits):
        return evaluate("logit", logits, ours.context)[0].mean()

    with torch.no_grad():
        idx, df = _cells(ours.mean().shape, ("layer", "pos"), 6, pm.n_layers, seed=7)
        ref = tlp.get_act_patch_attn_out(bridge, bids, zeros, metric, index_axis_names=None, index_df=df)
    assert (ref - ours.mean()[tuple(idx.unbind(1))]).abs().max() <= 1e-4
    assert (ours.mean() - ours.base.mean()).abs().max() > 1e-2  # zeroing attention does something


def test_sweep_errors(setup):
    pm, _, base, src, _, _ = setup
    with pytest.raises(CircuitkitError, match="valid"):
        sweep(pm, base, "heads", source=src, progress=False)
    with pytest.raises(CircuitkitError, match="source"):
        sweep(pm, base, "head", progress=False)
    with pytest.raises(CircuitkitError, match="6 inputs but source has 2"):
        sweep(pm, base, "head", source=src[:2], progress=False)
    other = next(t for t in pm.task.generate(random.Random(9), 500) if len(t) != len(base[0]))
    with pytest.raises(CircuitkitError, match="differ in length"):
        sweep(pm, [base[0]], "head", source=[other], progress=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", sorted(ROW_DIRECT))
def test_incremental_sweep_equals_the_full_recomputation(shape, kind):
    """A row-direct patch computed for the patched row alone (then the layers between for the rows from the
    patched one on, with the base's keys and values before it, and the last block at the answer row) gives the
    metric of re-running the patched block and every later one over every row: GPT-2 with 1, 2 and 3 layers
    (the last-block-only and layers-between branches), a parallel-residual NeoX and a gated, grouped-query,
    rotary Llama (3 layers each)."""
    pm = random_model("addition", **shape)
    rng = random.Random(1)
    base = pm.task.generate(rng, 12)
    src = [pm.task.contrast_random(t, rng) for t in base]
    fast = sweep(pm, base, kind, source=src, progress=False, metric="logit", target="A2")
    full = sweep(pm, base, kind, source=src, progress=False, metric="logit", target="A2", incremental=False)
    assert (fast.values - full.values).abs().max() <= 1e-4
    assert (full.values - full.base).abs().max() > 1e-2  # patches move the metric: the comparison can fail
