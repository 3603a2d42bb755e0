"""Attribution patching: exact directional derivatives, and rank agreement with exact patching."""
from __future__ import annotations

import random

import torch
from scipy.stats import spearmanr

from circuitkit.patching.ablations import as_ids
from circuitkit.patching.attribution import attribute
from circuitkit.patching.metrics import evaluate, metric_context
from circuitkit.patching.path import parse_receiver, receiver_hooks, sender_delta
from circuitkit.patching.sweep import sweep
from circuitkit.sites import parse_site
from circuitkit.types import Edge


def _pairs(task, n, seed):
    rng = random.Random(seed)
    base = task.generate(rng, n)
    return base, [task.contrast_random(t, rng) for t in base]


def test_attribution_is_the_directional_derivative(tiny_addition_model):
    """node: d/dε metric(base with a += ε·(a_src - a_base)) at ε = 0; edge: the same through one receiver."""
    pm = tiny_addition_model
    base, src = _pairs(pm.task, 6, 0)
    att = attribute(pm, base, src, metric="logit", target="A2")
    bids, sids = as_ids(pm.task, base), as_ids(pm.task, src)
    ctx = metric_context(pm.task, bids, sids, "A2")
    site = parse_site("a0.1")
    delta = sender_delta(pm, bids, sids, site, None, None)  # [b, pos, d_model]
    eps = torch.zeros((), requires_grad=True)

    def bump(act):
        act = act.clone()
        act[:, :, 1] = act[:, :, 1] + eps * delta
        return act
    logits, _ = pm.runner.run(bids, hooks={"blocks.0.attn.hook_result": bump})
    (d_eps,) = torch.autograd.grad(evaluate("logit", logits, ctx)[0].sum(), eps)
    assert torch.allclose(att.nodes["a0.1"].sum(), d_eps, rtol=1e-3, atol=1e-4)
    for rec_text, inp in (("a1.2", "k"), ("a1.0", "v"), ("m1", "resid")):
        rec = parse_receiver(rec_text, inp)
        eps = torch.zeros((), requires_grad=True)
        hooks = receiver_hooks(pm, rec, eps * delta, None)
        logits, _ = pm.runner.run(bids, hooks=hooks)
        (d_eps,) = torch.autograd.grad(evaluate("logit", logits, ctx)[0].sum(), eps)
        name = f"a1.{rec.head}.{inp}" if rec.kind == "head" else "m1.in"
        assert torch.allclose(att.edges[Edge.of("a0.1", name)].sum(), d_eps, rtol=1e-3, atol=1e-4), name


def test_attribution_ranks_like_exact_patching(tiny_addition_model):
    pm = tiny_addition_model
    base, src = _pairs(pm.task, 32, 1)
    att = attribute(pm, base, src, metric="logit", target="A2", edges=False)
    sw = sweep(pm, base, "head", source=src, metric="logit", target="A2", progress=False)
    exact = (sw.values - sw.base).mean(-1)  # [layer, pos, head]
    est = torch.stack([torch.stack([att.nodes[f"a{L}.{h}"].mean(0) for h in range(pm.n_heads)], -1)
                       for L in range(pm.n_layers)])
    live = exact.abs() > 1e-6  # cells that can matter at all
    rho = spearmanr(est[live].numpy(), exact[live].numpy()).statistic
    assert rho > 0.5, rho
