"""The fast runner must equal TransformerLens's bridge; per-head results must sum to attn out."""
from __future__ import annotations

import random

import pytest
import torch

from circuitkit.activations import collect_activations
from circuitkit.models.runner import ModelRunner
from circuitkit.sites import parse_site
from tests.random_models import SHAPES, random_model


@pytest.fixture(scope="module")
def bridge_and_cache(tiny_addition_model):
    pm = tiny_addition_model
    bridge = pm.bridge()
    bridge.set_use_attn_result(True)
    ids = pm.task.encode(pm.task.generate(random.Random(0), 16))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    return pm, ids, logits, cache


def test_runner_matches_bridge(bridge_and_cache):
    pm, ids, logits, cache = bridge_and_cache
    names = pm.runner.hook_names()
    with torch.no_grad():
        my_logits, mine = pm.runner.run(ids, cache=names)
    assert torch.allclose(my_logits, logits, atol=1e-4)
    compared = 0
    for n in names:
        if n in cache:
            assert torch.allclose(mine[n], cache[n], atol=1e-4), n
            compared += 1
    assert compared >= len(names) - 1


def test_head_results_sum_to_attention_output(bridge_and_cache):
    pm, ids, _, cache = bridge_and_cache
    for L in range(pm.n_layers):
        b_O = pm.runner.layers[L].b_O
        summed = cache[f"blocks.{L}.attn.hook_result"].sum(dim=2) + b_O
        assert torch.allclose(summed, cache[f"blocks.{L}.hook_attn_out"], atol=1e-5)
        with torch.no_grad():
            _, mine = pm.runner.run(ids, cache=[f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_attn_out"])
        assert torch.allclose(mine[f"blocks.{L}.attn.hook_result"].sum(2) + b_O, mine[f"blocks.{L}.hook_attn_out"],
                              atol=1e-5)


def test_stop_and_start_at_layer(tiny_addition_model):
    pm = tiny_addition_model
    ids = pm.task.encode(pm.task.generate(random.Random(1), 8))
    with torch.no_grad():
        full, cache = pm.runner.run(ids, cache=["blocks.1.hook_resid_pre"])
        _, early = pm.runner.run(ids, cache=["blocks.1.hook_resid_pre"], stop_at_layer=2)
        resumed, _ = pm.runner.run(ids, start_at_layer=1, resid=cache["blocks.1.hook_resid_pre"])
    assert torch.equal(early["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_pre"])
    assert torch.allclose(resumed, full, atol=1e-5)


def test_collect_activations_named_positions(tiny_counting_model):
    pm = tiny_counting_model
    texts = pm.task.generate(random.Random(2), 10)
    sites = [parse_site("a0.0@Q"), parse_site("x1.post@:"), parse_site("emb"), parse_site("pattern1.0@:")]
    acts = collect_activations(pm, texts, sites, batch_size=4)
    assert acts[sites[0]].shape == (10, 64) and acts[sites[2]].shape == (10, 33, 64)
    assert acts[sites[3]].shape == (10, 33)
    ids = pm.task.encode(texts)
    with torch.no_grad():
        _, cache = pm.runner.run(ids, cache=["blocks.1.hook_resid_post", "blocks.0.attn.hook_result"])
    for i, t in enumerate(texts):
        toks = pm.task.tokens(t)
        colon, q = toks.index(":"), toks.index("|") + 1
        assert torch.allclose(acts[sites[1]][i], cache["blocks.1.hook_resid_post"][i, colon])
        assert torch.allclose(acts[sites[0]][i], cache["blocks.0.attn.hook_result"][i, q, 0])
    probs = acts[sites[3]].sum(-1)
    assert torch.allclose(probs, torch.ones(10), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[2:], ids=["gpt2", "neox", "llama"])
@pytest.mark.parametrize("start", [0, 3, 6])
@torch.no_grad()
def test_block_suffix_equals_the_full_block_on_its_rows(shape, start):
    """A block run on rows s.. with rows 0..s-1 given only as keys and values (a KV cache) gives the full block's
    output on those rows: GPT-2, a rotary parallel-residual NeoX and a rotary grouped-query Llama."""
    pm = random_model("addition", **shape)
    r = pm.runner
    ids = pm.task.encode(pm.task.generate(random.Random(0), 5))
    L = 1
    _, cache = r.run(ids, cache=[f"blocks.{L}.hook_resid_pre", f"blocks.{L}.hook_resid_post"])
    x, full = cache[f"blocks.{L}.hook_resid_pre"], cache[f"blocks.{L}.hook_resid_post"]
    k, v = r.keys_values(L, r.norm1(L, x), torch.arange(x.shape[1]))
    part = r.block_suffix(L, x[:, start:], k[:, :start], v[:, :start])
    assert part.shape == full[:, start:].shape
    assert torch.allclose(part, full[:, start:], atol=1e-5)
    changed = x.clone()
    changed[:, start] += 1.0  # a change at row s moves row s's output: the comparison can fail
    moved = r.block_suffix(L, changed[:, start:], k[:, :start], v[:, :start])
    assert (moved[:, 0] - full[:, start]).abs().max() > 1e-3


def test_block_suffix_refuses_a_bidirectional_model():
    from circuitkit.models.native import NativeConfig, NativeTransformer

    m = NativeTransformer(NativeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=5, d_vocab_out=3,
                                       n_ctx=4, attention_dir="bidirectional"))
    r = ModelRunner(m)
    with pytest.raises(ValueError, match="needs a causal model"):
        r.block_suffix(0, torch.zeros(1, 2, 8), torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
