"""Attribution patching: a first-order estimate of every node's and edge's patching effect.

One forward and one backward pass on the base input (plus a source forward for the activation
differences):  effect(node) ≈ (a_source - a_base) · ∂metric/∂a  at every position (and head);
effect(sender -> receiver) ≈ Σ_pos (sender_source - sender_base) · ∂metric/∂(receiver's input),
where the receiver's input is the residual stream as read by that receiver only (a head's q, k
or v, an MLP's input, or the logits), obtained by a local vector-Jacobian product through its
LayerNorm and input weights.  A fast screen: confirm what it ranks high with exact patching.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.ablations import as_ids, check_pairing
from circuitkit.patching.metrics import MetricContext, evaluate, metric_context
from circuitkit.patching.path import feeds
from circuitkit.results import JsonResult
from circuitkit.sites import Site
from circuitkit.types import Edge, Node


@dataclass
class AttributionResult(JsonResult):
    """nodes: site node name -> [b, pos] (per head sites) estimated metric change;
    edges: sender site -> receiver input (``types.Edge``) -> [b] estimated change through that edge alone."""

    metric: str
    nodes: dict[str, Tensor]
    edges: dict[Edge, Tensor]
    base: Tensor  # [b]
    context: MetricContext = field(repr=False)

    def node_means(self) -> dict[str, Tensor]:
        return {k: v.mean(0) for k, v in self.nodes.items()}

    def edge_means(self) -> dict[Edge, float]:
        return {k: float(v.mean()) for k, v in self.edges.items()}

    def to_dict(self) -> dict:
        return {"metric": self.metric, "n": int(self.base.numel()),
                "nodes": {k: v.tolist() for k, v in self.node_means().items()},
                "edges": [{"sender": str(e.sender), "receiver": str(e.receiver), "estimate": v}
                          for e, v in self.edge_means().items()]}


def senders(n_layers: int, n_heads: int, learned_positions: bool = True) -> list[Site]:
    """Everything that writes into the residual stream, in forward order (rotary models add no
    position embedding: ``learned_positions=False``)."""
    out = [Site("emb")] + ([Site("pos")] if learned_positions else [])
    for L in range(n_layers):
        out += [Site("head", L, h) for h in range(n_heads)] + [Site("mlp_out", L)]
    return out


def attribute(
    pm: ProbedModel,
    base: Sequence[str] | Tensor,
    source: Sequence[str] | Tensor,
    metric: str = "logit_diff",
    target: str | None = None,
    edges: bool = True,
) -> AttributionResult:
    task, r, dev = pm.task, pm.runner, pm.device
    base_ids, src_ids = as_ids(task, base, "base"), as_ids(task, source, "source")
    check_pairing(task, base_ids, src_ids, raw_positions=True)
    snd = senders(pm.n_layers, pm.n_heads, learned_positions="hook_pos_embed" in r.hook_names())
    snd_hooks = sorted({s.hook_name for s in snd})
    gated = any(w.W_gate is not None for w in r.layers)
    recv_hooks = [f"blocks.{L}.{n}" for L in range(pm.n_layers)
                  for n in ("hook_resid_pre", "hook_resid_mid", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                            "mlp.hook_pre") + (("mlp.hook_pre_linear",) if gated else ())]
    recv_hooks.append(f"blocks.{pm.n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        _, src_cache = r.run(src_ids.to(dev), cache=snd_hooks)
    with torch.enable_grad():
        logits, cache = r.run(base_ids.to(dev), cache=snd_hooks + recv_hooks)
        ctx = metric_context(task, base_ids, src_ids, target, logits.detach())
        vals = evaluate(metric, logits, ctx)[0]
        names = snd_hooks + recv_hooks
        grads = dict(zip(names, torch.autograd.grad(vals.sum(), [cache[n] for n in names], allow_unused=True)))
    nodes: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    for s in snd:
        d = (s.select(src_cache[s.hook_name]) - s.select(cache[s.hook_name])).detach()  # [b, pos, d_model]
        g = grads[s.hook_name]
        g = torch.zeros_like(d) if g is None else s.select(g)
        nodes[s.node] = (d * g).sum(-1).cpu()
        deltas[s.node] = d
    edge_scores: dict[Edge, Tensor] = {}
    if edges:
        for rname, rkind, rlayer, gin in _receiver_grads(pm, cache, grads):
            receiver = Node("input", rname)
            for s in snd:
                if feeds(s, rkind, rlayer, r.arch.parallel):
                    edge_scores[Edge(Node.of(s), receiver)] = (deltas[s.node] * gin).sum((-1, -2)).cpu()
    return AttributionResult(metric, nodes, edge_scores, vals.detach().cpu(), ctx)


def _receiver_grads(pm: ProbedModel, cache: dict[str, Tensor], grads: dict[str, Tensor | None]):
    """Yield (receiver name, kind, layer, ∂metric/∂(its residual input) [b, pos, d_model]).

    Receivers: every head's q, k and v (``aL.H.q``; with grouped-query attention a key/value head is
    shared, so its k and v are one receiver per key/value head, ``aL.kvG.k``), every MLP's input
    (``mL.in``: resid_mid, or the block's input with a parallel residual; both halves of a gated MLP)
    and the logits."""
    r = pm.runner
    shared_kv = r.n_kv_heads != r.n_heads
    for L in range(pm.n_layers):
        x = cache[f"blocks.{L}.hook_resid_pre"].detach().requires_grad_(True)
        with torch.enable_grad():
            h1 = r.norm1(L, x)
            for name in ("q", "k", "v"):
                g = grads[f"blocks.{L}.attn.hook_{name}"]
                if g is None:
                    continue
                kv = shared_kv and name != "q"
                for h in range(r.n_kv_heads if kv else r.n_heads):
                    out = r.project(L, name, h1, head=h)
                    (gin,) = torch.autograd.grad(out, x, g[:, :, h], retain_graph=True)
                    yield (f"a{L}.kv{h}.{name}" if kv else f"a{L}.{h}.{name}"), "head", L, gin.detach()
        outs = [(r.mlp_pre, grads[f"blocks.{L}.mlp.hook_pre"])]
        if r.layers[L].W_gate is not None:
            outs.append((r.mlp_pre_linear, grads[f"blocks.{L}.mlp.hook_pre_linear"]))
        outs = [(fn, g) for fn, g in outs if g is not None]
        if outs:
            xm = cache[r.mlp_input_hook(L)].detach().requires_grad_(True)
            with torch.enable_grad():
                hm = r.norm2(L, xm)
                gin = torch.autograd.grad([fn(L, hm) for fn, _ in outs], xm, [g for _, g in outs])[0]
            yield f"m{L}.in", "mlp", L, gin.detach()
    g = grads[f"blocks.{pm.n_layers - 1}.hook_resid_post"]
    yield "logits", "logits", None, g.detach()
