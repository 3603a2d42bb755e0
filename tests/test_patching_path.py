"""Path patching equals the explicit IOI two-run computation; node patching and errors."""
from __future__ import annotations

import random

import pytest
import torch

from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.ablations import as_ids
from circuitkit.patching.metrics import evaluate, metric_context
from circuitkit.patching.node import patch_nodes
from circuitkit.patching.path import path_patch, path_patch_to_site
from circuitkit.sites import parse_site
from tests.random_models import SHAPES, random_model


@pytest.fixture(scope="module")
def sharp_model(addition_task):
    """Paper-shaped addition GPT-2 with large random weights: every path carries a clear effect
    (the briefly trained fixture barely uses its layer-1 attention yet)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(addition_task.vocab), n_positions=addition_task.seq_len, n_embd=32, n_layer=2,
                     n_head=4, activation_function="gelu_new", initializer_range=0.4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return ProbedModel(GPT2LMHeadModel(cfg).eval(), addition_task)


@pytest.fixture(scope="module")
def pairs(tiny_addition_model):
    task = tiny_addition_model.task
    rng = random.Random(5)
    base = task.generate(rng, 8)
    return base, [task.contrast_random(t, rng) for t in base]


def _explicit(pm, base, src, s_layer, s_head, s_pos, r_layer, r_head, r_input, metric="logit", target="A1"):
    """Run 1: sender from source, every other head and MLP frozen at base; record the receiver's
    input.  Run 2: base run with only that input replaced."""
    r, task = pm.runner, pm.task
    bids, sids = as_ids(task, base), as_ids(task, src)
    names = [f"blocks.{L}.attn.hook_result" for L in range(pm.n_layers)] + \
            [f"blocks.{L}.hook_mlp_out" for L in range(pm.n_layers)]
    with torch.no_grad():
        clean, bc = r.run(bids, cache=names)
        _, sc = r.run(sids, cache=names)
    hooks = {}
    for L in range(pm.n_layers):
        def freeze_heads(act, L=L):
            act = bc[f"blocks.{L}.attn.hook_result"].clone()
            if L == s_layer:
                act[:, s_pos, s_head] = sc[f"blocks.{L}.attn.hook_result"][:, s_pos, s_head]
            return act
        hooks[f"blocks.{L}.attn.hook_result"] = freeze_heads
        hooks[f"blocks.{L}.hook_mlp_out"] = lambda act, L=L: bc[f"blocks.{L}.hook_mlp_out"]
    rec_name = f"blocks.{r_layer}.attn.hook_{r_input}"
    with torch.no_grad():
        _, run1 = r.run(bids, hooks=hooks, cache=[rec_name])

        def set_input(act):
            act = act.clone()
            act[:, :, r_head] = run1[rec_name][:, :, r_head]
            return act
        patched, _ = r.run(bids, hooks={rec_name: set_input})
    ctx = metric_context(task, bids, sids, target)
    return evaluate(metric, clean, ctx)[0], evaluate(metric, patched, ctx)[0]


@pytest.mark.parametrize("r_input", ["q", "k", "v"])
def test_path_patch_equals_explicit_two_runs(sharp_model, pairs, r_input):
    pm = sharp_model
    base, src = pairs
    moved = 0.0
    for s_head, s_pos, r_head in [(0, 8, 1), (2, 6, 3), (3, 8, 0)]:  # A1 is read at "=" (8)
        res = path_patch(pm, base, src, f"a0.{s_head}@{s_pos}", f"a1.{r_head}", r_input, metric="logit", target="A1")
        clean, patched = _explicit(pm, base, src, 0, s_head, s_pos, 1, r_head, r_input)
        assert torch.allclose(res.clean, clean, atol=1e-5)
        assert torch.allclose(res.patched, patched, atol=1e-4)
        moved = max(moved, float((patched - clean).abs().max()))
    assert moved > 1e-2  # the paths carry a clear effect


def test_path_to_logits_is_direct_effect(sharp_model, pairs):
    pm = sharp_model
    base, src = pairs
    bids, sids = as_ids(pm.task, base), as_ids(pm.task, src)
    direct = path_patch(pm, base, src, "a1.2@=", "logits", metric="logit", target="A1")
    node = patch_nodes(pm, base, ["a1.2@="], source=src, metric="logit", target="A1")
    names = ["blocks.1.attn.hook_result", "blocks.1.hook_mlp_out"]
    with torch.no_grad():
        _, bc = pm.runner.run(bids, cache=names)
        _, sc = pm.runner.run(sids, cache=names)

        def head(act):
            act = act.clone()
            act[:, 8, 2] = sc[names[0]][:, 8, 2]
            return act
        frozen, _ = pm.runner.run(bids, hooks={names[0]: head, names[1]: lambda act: bc[names[1]]})
    expected = evaluate("logit", frozen, metric_context(pm.task, bids, sids, "A1"))[0]
    assert torch.allclose(direct.patched, expected, atol=1e-4)
    # the total effect also flows through the layer-1 MLP, so it differs from the direct path
    assert (node.patched - direct.patched).abs().max() > 1e-3


def test_node_patching_ablations(tiny_counting_model):
    pm = tiny_counting_model
    task = pm.task
    rng = random.Random(1)
    base = task.generate(rng, 12)
    src = [task.contrast_random(t, rng) for t in base]
    # patching the whole final residual stream from the source gives the source's own logits
    full = patch_nodes(pm, base, [f"x{pm.n_layers - 1}.post"], source=src, metric="logit_diff")
    ids_b, ids_s = task.encode(base), task.encode(src)
    with torch.no_grad():
        src_logits = pm.runner.logits(ids_s)
    ctx = metric_context(task, ids_b, ids_s)
    assert torch.allclose(full.patched, evaluate("logit_diff", src_logits, ctx)[0], atol=1e-4)
    for ab in ("zero", "mean", "resample"):
        r = patch_nodes(pm, base, ["a1.0@:"], ablation=ab, metric="prob", reference=task.generate(rng, 20))
        assert r.patched.shape == (12,) and r.summary()["effect"].ci_low <= r.summary()["effect"].mean
    kl = patch_nodes(pm, base, ["a1.0@:"], ablation="zero", metric="kl")
    assert (kl.patched >= -1e-6).all() and kl.clean.abs().max() < 1e-5 and kl.patched.max() > 0


def test_errors(tiny_counting_model, tiny_addition_model, pairs):
    pm = tiny_counting_model
    task = pm.task
    base = task.generate(random.Random(2), 4)
    with pytest.raises(CircuitkitError, match="layer 5 does not exist"):
        patch_nodes(pm, base, ["a5.0@:"], ablation="zero", metric="prob")
    with pytest.raises(CircuitkitError, match="head 3 does not exist"):
        patch_nodes(pm, base, ["a1.3@:"], ablation="zero", metric="prob")
    with pytest.raises(CircuitkitError, match="out of range"):
        patch_nodes(pm, base, ["a1.0@40"], ablation="zero", metric="prob")
    with pytest.raises(CircuitkitError, match="unknown position"):
        patch_nodes(pm, base, ["a1.0@=="], ablation="zero", metric="prob")
    with pytest.raises(CircuitkitError, match="competing answer"):
        patch_nodes(pm, base, ["a1.0@:"], ablation="zero", metric="logit_diff")
    with pytest.raises(CircuitkitError, match="unknown ablation"):
        patch_nodes(pm, base, ["a1.0@:"], ablation="shuffle", metric="prob")
    with pytest.raises(CircuitkitError, match="not in the vocabulary"):  # a source from another task
        patch_nodes(pm, base, ["a1.0@:"], source=["B123+456=579E"] * 4)
    longer = [t for t in task.generate(random.Random(3), 200) if len(t) != len(base[0])][:4]
    with pytest.raises(CircuitkitError, match="differ in length"):
        patch_nodes(pm, base, ["a1.0@20"], source=longer)
    patch_nodes(pm, base, ["a1.0@:"], source=longer)  # named positions align different lengths
    abase, asrc = pairs
    with pytest.raises(CircuitkitError, match="not upstream"):
        path_patch(tiny_addition_model, abase, asrc, "a1.0@3", "a0.1", "q")


def test_site_receiver_form_equals_input_form(sharp_model, pairs):
    """The circuit graph's site-receiver path patching (freeze, record the receiver, patch it into
    a clean run) equals receiver-input path patching for a head receiver at every position."""
    pm = sharp_model
    base, src = pairs
    bids, sids = as_ids(pm.task, base), as_ids(pm.task, src)
    ctx = metric_context(pm.task, bids, sids, "A1")
    moved = 0.0
    for s_head, s_pos, r_head in [(0, 8, 1), (3, 6, 2)]:
        res = path_patch(pm, base, src, f"a0.{s_head}@{s_pos}", f"a1.{r_head}", "resid", metric="logit", target="A1")
        logits = path_patch_to_site(pm, bids, sids, parse_site(f"a0.{s_head}@{s_pos}"), parse_site(f"a1.{r_head}"))
        assert torch.allclose(evaluate("logit", logits, ctx)[0], res.patched, atol=1e-4)
        moved = max(moved, float((res.patched - res.clean).abs().max()))
    assert moved > 1e-2  # the paths carry a clear effect


@pytest.mark.parametrize("shape", SHAPES[2:4])
@pytest.mark.parametrize("sender,receiver,bundle", [
    ("a0.1@F2", "a2.0@F2", True),     # layer 0 -> 2: the steps start at blocks 0 and 2
    ("m1@S2", "x2.mid@S2", True),     # a residual receiver through its bundle, from block 1
    ("a1.0@S1", "m2@S1", True),       # a head into a later MLP
    ("emb@F3", "m0@F3", True),        # an embedding sender: step (1) from the embeddings
    ("a1.1@=", "x2.post@=", False),   # into the unembedding's input, the direct path only
])
def test_incremental_site_path_patch_equals_the_full_recomputation(shape, sender, receiver, bundle):
    """Path patching into a site gives the same logits when each pass starts at the block it changes (the
    sender's, the receiver's) as when every pass runs from the embeddings: 3-layer GPT-2 and NeoX."""
    pm = random_model("addition", std=0.4, **shape)  # heads that move the logits visibly
    rng = random.Random(3)
    base = pm.task.generate(rng, 16)
    src = [pm.task.contrast_random(t, rng) for t in base]
    bids, sids = as_ids(pm.task, base), as_ids(pm.task, src)
    s, r = parse_site(sender), parse_site(receiver)
    fast = path_patch_to_site(pm, bids, sids, s, r, through_bundle=bundle)
    full = path_patch_to_site(pm, bids, sids, s, r, through_bundle=bundle, incremental=False)
    assert (fast - full).abs().max() <= 1e-4
    clean = pm.runner.run(bids)[0]
    assert (full - clean).abs().max() > 1e-2  # the path moves the logits: the comparison can fail
