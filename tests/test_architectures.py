"""GPT-NeoX (parallel residual, partial rotary) and Llama-style (RMSNorm, rotary, gated SiLU MLP, grouped-query
attention) checkpoints, tiny and random, saved by transformers: the runner equals the HF forward and the
TransformerLens bridge, `sites` lists them with no task, and a head x position sweep equals TransformerLens's
patching within 1e-4."""
from __future__ import annotations

import json
import random

import pytest
import torch

from circuitkit.cli import main
from circuitkit.models.checkpoint import load_probed
from tests.conftest import NAMES, OBJECTS, PLACES, WORDS, _row


def _save(root, family: str):
    """A tiny random ``family`` model with the prompt-pairs tokenizer and 40 rows of pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<|endoftext|>", "When", ","] + [f"Ġ{w}" for w in WORDS[1:-1] + NAMES + PLACES + OBJECTS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    model_dir = root / family
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(model_dir)
    torch.manual_seed(0)
    common = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(**common, use_parallel_residual=True, hidden_act="gelu",
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5})
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, num_key_value_heads=2, hidden_act="silu", tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random weights of a visible size, so that differences would show
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(model_dir)
    rng = random.Random(0)
    pairs = [(io, s) for io in NAMES for s in NAMES if io != s]
    rows = [_row(io, s, rng.choice(PLACES), rng.choice(OBJECTS)) for io, s in rng.sample(pairs, 40)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir, root / "pairs.jsonl"


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def family_model(request, tmp_path_factory):
    model_dir, jsonl = _save(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, model_dir, jsonl, load_probed(model_dir, task=f"prompt_pairs:{jsonl}")


def test_runner_equals_the_hf_forward_and_the_bridge(family_model):
    family, _, _, pm = family_model
    ids = pm.task.encode(list(pm.task.split("test"))[:8])
    names = pm.runner.hook_names()
    with torch.no_grad():
        hf = pm.hf_model(ids).logits
        mine, cache = pm.runner.run(ids, cache=names)
        bridge = pm.bridge()
        bridge.set_use_attn_result(True)
        ref_logits, ref = bridge.run_with_cache(ids)
    assert (mine - hf).abs().max() <= 1e-4
    assert (mine - ref_logits).abs().max() <= 1e-4
    compared = [n for n in names if n in ref and ref[n].shape == cache[n].shape]
    for n in compared:
        assert (cache[n] - ref[n]).abs().max() <= 1e-4, n
    must = {f"blocks.{L}.{h}" for L in range(pm.n_layers) for h in ("hook_resid_pre", "attn.hook_z",
                                                                       "attn.hook_pattern", "hook_mlp_out")}
    assert must <= set(compared), must - set(compared)


def test_start_at_layer_and_the_single_row_block_agree_with_the_full_pass(family_model):
    _, _, _, pm = family_model
    r = pm.runner
    ids = pm.task.encode(list(pm.task.split("test"))[:6])
    with torch.no_grad():
        full, c = r.run(ids, cache=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
        resumed, _ = r.run(ids, start_at_layer=1, resid=c["blocks.1.hook_resid_pre"])
        t = torch.tensor([3, 5, 7, 9, 11, 13])
        row = r.block_at_rows(1, c["blocks.1.hook_resid_pre"], t)
    assert (resumed - full).abs().max() <= 1e-5
    assert (row - c["blocks.1.hook_resid_post"][torch.arange(6), t]).abs().max() <= 1e-5


def test_sites_needs_no_task(family_model, capsys):
    _, model_dir, _, pm = family_model
    assert main(["sites", str(model_dir), "--json"]) == 0
    sites = {s["site"] for s in json.loads(capsys.readouterr().out)["sites"]}
    assert {"a0.0", "a1.3", "m0", "m1", "x1.post"} <= sites and "a2.0" not in sites and "a1.4" not in sites


def test_a_head_sweep_equals_transformer_lens_patching(family_model):
    from transformer_lens import patching as tl_patching

    from circuitkit.patching.metrics import evaluate
    from circuitkit.patching.sweep import sweep

    _, _, _, pm = family_model
    base = list(pm.task.split("test"))[:8]
    src = [pm.task.contrast_minimal(t, random.Random(0)) for t in base]
    ours = sweep(pm, base, "head", source=src, progress=False)
    ctx = ours.context

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return evaluate("logit_diff", logits, ctx)[0].mean()

    bridge = pm.bridge()
    bridge.set_use_attn_result(True)
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(pm.task.encode(src))
        ref = tl_patching.get_act_patch_attn_head_out_by_pos(bridge, pm.task.encode(base), clean_cache, metric)
    assert ref.shape == ours.mean().shape
    assert (ref - ours.mean()).abs().max() <= 1e-4
    assert (ours.mean() - ours.base.mean()).abs().max() > 1e-3  # some cell moves the metric: the test can fail


def _pairs_of(pm, n: int) -> tuple[list[str], list[str]]:
    base = list(pm.task.split("test"))[:n]
    return base, [pm.task.contrast_minimal(t, random.Random(0)) for t in base]


def test_attribution_is_the_directional_derivative(family_model):
    """Attribution on parallel-residual, gated and grouped-query blocks: a node's estimate is
    d/dε metric(base with a += ε·(a_src − a_base)) at ε = 0, and an edge's is the same through one receiver's
    input only (a head's q, a shared key/value head's k, an MLP's input)."""
    from circuitkit.patching.ablations import as_ids
    from circuitkit.patching.attribution import attribute
    from circuitkit.patching.metrics import evaluate, metric_context
    from circuitkit.patching.path import parse_receiver, receiver_hooks, sender_delta
    from circuitkit.sites import parse_site
    from circuitkit.types import Edge

    family, _, _, pm = family_model
    r = pm.runner
    base, src = _pairs_of(pm, 6)
    att = attribute(pm, base, src)
    bids, sids = as_ids(pm.task, base), as_ids(pm.task, src)
    ctx = metric_context(pm.task, bids, sids, None)
    delta = sender_delta(pm, bids, sids, parse_site("a0.1"), None, None)  # [b, pos, d_model]

    def derivative(hooks_for) -> torch.Tensor:
        eps = torch.zeros((), requires_grad=True)
        logits, _ = r.run(bids, hooks=hooks_for(eps))
        return torch.autograd.grad(evaluate("logit_diff", logits, ctx)[0].sum(), eps)[0]

    def bump(eps):
        def hook(act):
            act = act.clone()
            act[:, :, 1] = act[:, :, 1] + eps * delta
            return act
        return {"blocks.0.attn.hook_result": hook}
    d = derivative(bump)
    assert d.abs() > 1e-4  # the sender matters, so the comparisons below can fail
    assert torch.allclose(att.nodes["a0.1"].sum(), d, rtol=1e-3, atol=1e-4)
    for rec_text, inp, name in (("a1.2", "q", "a1.2.q"), ("m1", "resid", "m1.in")):
        rec = parse_receiver(rec_text, inp)
        d = derivative(lambda eps, rec=rec: receiver_hooks(pm, rec, eps * delta, None))
        assert torch.allclose(att.edges[Edge.of("a0.1", name)].sum(), d, rtol=1e-3, atol=1e-4), name

    def shared_k(eps):  # key/value head 1 (shared by its query heads) reads resid + ε·delta
        seen = {}

        def k_hook(act):
            act = act.clone()
            act[:, :, 1] = r.project(1, "k", r.norm1(1, seen["x"] + eps * delta), head=1)
            return act
        return {"blocks.1.hook_resid_pre": lambda x: seen.__setitem__("x", x), "blocks.1.attn.hook_k": k_hook}
    k_name = "a1.kv1.k" if r.n_kv_heads != r.n_heads else "a1.1.k"
    assert torch.allclose(att.edges[Edge.of("a0.1", k_name)].sum(), derivative(shared_k), rtol=1e-3, atol=1e-4)
    # a parallel residual: a layer's MLP does not read its own attention's output
    assert (Edge.of("a0.1", "m0.in") in att.edges) == (not r.arch.parallel)
    assert ("pos" in {str(e.sender) for e in att.edges}) == ("hook_pos_embed" in r.hook_names())


def test_circuit_evaluation_and_edges_on_other_blocks(family_model):
    """Aligned resample ablation on parallel-residual and gated blocks: the complete edge set reproduces
    node-level faithfulness, dropping edges changes it, and the depth order knows that a parallel
    block's MLP does not read its attention."""
    from circuitkit.circuit.edges_eval import complete_edges, edge_faithfulness
    from circuitkit.circuit.evaluate import AblationEvaluator
    from circuitkit.types import Edge

    family, _, _, pm = family_model
    ev = AblationEvaluator(pm, n=40, seed=0, n_boot=50)
    assert (Edge.of("a0.1", "m0") in complete_edges(ev, ["a0.1", "m0"])) == (not pm.runner.arch.parallel)
    # raw mean logit differences: on these random models the normalisation can be undefined (m(M) <= m(∅))
    for sites in (["a0.1", "m0", "a1.2", "m1"], ["x0.post", "a1.0", "m1"], ["x0.mid", "m0", "a1.3"]):
        edges = complete_edges(ev, sites)
        node = ev.means(ev.score(sites).logit_diff)
        e = edge_faithfulness(ev, sites, edges, ci=False)
        for k in node:
            assert e.means["logit_diff"][k] == pytest.approx(node[k], rel=1e-4, abs=1e-4), (sites, k)
    sites = ["a0.1", "m0", "a1.2", "m1"]
    node = ev.means(ev.score(sites).logit_diff)
    fewer = [x for x in complete_edges(ev, sites) if x != Edge.of("a0.1", "a1.2")]
    e = edge_faithfulness(ev, sites, fewer, ci=False)
    full, empty = ev.means(ev.full.logit_diff), ev.means(ev.empty.logit_diff)  # the scale of a change
    assert any(abs(e.means["logit_diff"][k] - node[k]) > 1e-3 * abs(full[k] - empty[k]) for k in node)


def test_path_patching_gives_a_head_its_own_keys_and_values(family_model):
    """A head's k or v receiver: without a group, its own copy (recomputed scores and z) equals patching the
    key/value activation; with grouped-query attention, where a key/value head is shared, the first-order
    effects of giving each head of a group its own copy add up to patching the shared head, and the other
    heads' attention is untouched."""
    from circuitkit.patching.ablations import as_ids
    from circuitkit.patching.metrics import evaluate, metric_context
    from circuitkit.patching.path import parse_receiver, receiver_hooks, sender_delta
    from circuitkit.sites import parse_site

    family, _, _, pm = family_model
    r = pm.runner
    base, src = _pairs_of(pm, 6)
    bids, sids = as_ids(pm.task, base), as_ids(pm.task, src)
    ctx = metric_context(pm.task, bids, sids, None)
    delta = sender_delta(pm, bids, sids, parse_site("a0.1"), None, None)
    if r.n_kv_heads == r.n_heads:
        emb = sender_delta(pm, bids, sids, parse_site("emb"), None, None)  # the flipped token itself: a large delta
        z = "blocks.1.attn.hook_z"
        _, clean = r.run(bids, cache=[z])
        for inp in ("k", "v", "resid"):
            rec = parse_receiver("a1.2", inp)
            plain, c1 = r.run(bids, hooks=receiver_hooks(pm, rec, emb, None), cache=[z])
            own, c2 = r.run(bids, hooks=receiver_hooks(pm, rec, emb, None, force_per_head_kv=True), cache=[z])
            assert (plain - own).abs().max() <= 1e-4 and (c1[z] - c2[z]).abs().max() <= 1e-5, inp
            assert (c1[z][:, :, 2] - clean[z][:, :, 2]).abs().max() > 1e-4, inp  # the patch moves head 2 (10x the tolerance)
        return

    def derivative(hooks_for) -> torch.Tensor:
        eps = torch.zeros((), requires_grad=True)
        logits, _ = r.run(bids, hooks=hooks_for(eps))
        return torch.autograd.grad(evaluate("logit_diff", logits, ctx)[0].sum(), eps)[0]

    group = [h for h in range(r.n_heads) if h // (r.n_heads // r.n_kv_heads) == 1]  # the heads sharing kv head 1

    def shared(name: str):
        def hooks_for(eps):
            seen = {}

            def hook(act):
                act = act.clone()
                act[:, :, 1] = r.project(1, name, r.norm1(1, seen["x"] + eps * delta), head=1)
                return act
            return {"blocks.1.hook_resid_pre": lambda x: seen.__setitem__("x", x), f"blocks.1.attn.hook_{name}": hook}
        return hooks_for
    for name in ("k", "v"):
        per_head = sum(derivative(lambda eps, h=h, n=name: receiver_hooks(pm, parse_receiver(f"a1.{h}", n), eps * delta,
                                                                   None)) for h in group)
        whole = derivative(shared(name))
        assert whole.abs() > 1e-4 and torch.allclose(per_head, whole, rtol=1e-3, atol=1e-4), name
    hooks = receiver_hooks(pm, parse_receiver(f"a1.{group[0]}", "k"), delta, None)
    _, patched = r.run(bids, hooks=hooks, cache=["blocks.1.attn.hook_pattern"])
    _, clean = r.run(bids, cache=["blocks.1.attn.hook_pattern"])
    moved = (patched["blocks.1.attn.hook_pattern"] - clean["blocks.1.attn.hook_pattern"]).abs().amax((0, 2, 3))
    assert moved[group[0]] > 1e-4 and moved[[h for h in range(r.n_heads) if h != group[0]]].max() == 0
