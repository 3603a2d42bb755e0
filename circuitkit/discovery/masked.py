"""Run a model as an edge circuit: each receiver reads the live senders along kept edges, the rest ablated.

For receiver r and the residual stream x it reads in this run,

    input_r = x − Σ_{s upstream of r, edge s→r not kept} (out_s − out_s^ablated)

where out_s is sender s's output in this run and out_s^ablated its output on the ablation source (the aligned
counterfactual, or the mean / zero value).  With every edge kept the run is the model; with none, every
receiver reads the ablated stream.  This is EAP-IG's and MIB's edge intervention, applied through the one
engine (``patching.engine.run``) as the ``EdgeMask`` intervention; many circuits run at once, one copy of the
batch per circuit.

A circuit that keeps every edge into the blocks before ``start`` computes those blocks as the model does, so its
run may begin at block ``start`` from the base's own residual stream (``CleanRun``), with the senders before it
taken from the base's clean outputs: exact edge scoring and ACDC ablate edges into one layer at a time, and
skip the blocks below it (``start_of``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuitkit.discovery.edge_graph import QKV, EdgeGraph
from circuitkit.models.runner import Hook, ModelRunner
from circuitkit.patching import engine
from circuitkit.patching.metrics import MetricContext, evaluate


def sender_hooks(graph: EdgeGraph) -> list[str]:
    """The hooks holding every sender's output: block 0's input, each layer's head results and MLP output."""
    names = ["blocks.0.hook_resid_pre"]
    for L in range(graph.n_layers):
        names += [f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_mlp_out"]
    return names


def sender_outputs(graph: EdgeGraph, cache: dict[str, Tensor]) -> Tensor:
    """Every sender's output from a cache of ``sender_hooks``: [n_senders, b, pos, d_model]."""
    outs = [cache["blocks.0.hook_resid_pre"]]
    for L in range(graph.n_layers):
        res = cache[f"blocks.{L}.attn.hook_result"]  # [b, pos, head, d_model]
        outs += [res[:, :, h] for h in range(graph.n_heads)] + [cache[f"blocks.{L}.hook_mlp_out"]]
    return torch.stack(outs)


def ablated_outputs(runner: ModelRunner, graph: EdgeGraph, source: Tensor) -> Tensor:
    """Every sender's output on the ablation source tokens [b, pos]: [n_senders, b, pos, d_model]."""
    cache: dict[str, Tensor] = {}
    with torch.no_grad():
        engine.run(runner, source, [engine.Record(sender_hooks(graph), cache)], need_logits=False)
    return sender_outputs(graph, cache)


@dataclass(frozen=True)
class CleanRun:
    """The base's own run, for circuits that start mid-way: every sender's output [n_senders, b, pos, d_model]
    and the residual stream entering each block {layer: [b, pos, d_model]}."""

    outputs: Tensor
    resid: dict[int, Tensor]


def clean_run(runner: ModelRunner, graph: EdgeGraph, base: Tensor) -> CleanRun:
    """``CleanRun`` of ``base`` [b, pos] (one forward)."""
    cache: dict[str, Tensor] = {}
    names = sender_hooks(graph) + [f"blocks.{L}.hook_resid_pre" for L in range(1, graph.n_layers)]
    with torch.no_grad():
        engine.run(runner, base, [engine.Record(names, cache)], need_logits=False)
    resid = {L: cache[f"blocks.{L}.hook_resid_pre"] for L in range(1, graph.n_layers)}
    return CleanRun(sender_outputs(graph, cache), resid)


def start_of(graph: EdgeGraph, keep: Tensor) -> int:
    """The first block whose input any of the circuits ``keep`` [c, S, R] changes: the lowest layer of a
    receiver with an ablated edge (the logits count as the last block; ``graph.n_layers - 1`` when none)."""
    dropped = (~keep & graph.real).any(dim=(0, 1)) if keep.ndim == 3 else (~keep & graph.real).any(dim=0)
    layers = [min(graph.receivers[j].layer, graph.n_layers - 1) for j in dropped.nonzero().flatten().tolist()]
    return min(layers, default=graph.n_layers - 1)


def senders_before(graph: EdgeGraph, layer: int) -> int:
    """How many senders write before block ``layer`` (the embeddings and every earlier head and MLP)."""
    return 1 + layer * (graph.n_heads + 1)


@dataclass
class EdgeMask:
    """Engine intervention: run ``copies`` circuits at once on a batch repeated ``copies`` times.

    keep: [copies, n_senders, n_receivers] bool; ablated: [n_senders, b, pos, d_model] (repeated per copy).
    probe: [n_receivers, copies*b, pos, d_model], added to every receiver's input (zeros that require grad give
    ∂metric/∂(each receiver's input), the gradient attribution methods need).
    start / clean: begin at block ``start`` (module doc); the senders before it are ``clean.outputs``, and
    every edge into a receiver before it must be kept."""

    graph: EdgeGraph
    keep: Tensor
    ablated: Tensor
    probe: Tensor | None = None
    start: int = 0
    clean: CleanRun | None = None
    _delta: list[Tensor] = field(default_factory=list, repr=False)  # per active sender so far: [copies*b, pos, d]
    _seen: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def layer(self) -> int:
        return self.start

    def __post_init__(self) -> None:
        self.keep = self.graph.check_mask(self.keep if self.keep.ndim == 3 else self.keep[None])
        drop = (~self.keep & self.graph.real).float()  # [c, S, R]: 1 where the edge is ablated
        # Only the senders some circuit ablates along some edge enter a correction ("active"): exact scoring drops
        # one edge per circuit, and carrying every sender's delta would move gigabytes per hook at GPT-2's shape.
        active = drop.any(dim=(0, 2)).nonzero().flatten().tolist()
        self._slot = {s: k for k, s in enumerate(active)}
        self._drop = drop[:, active, :]  # [c, A, R]
        self._abl = self.ablated[active]  # [A, b, pos, d]; broadcast over the copies, never repeated
        if self.start > 0:
            if self.clean is None:
                raise ValueError("an EdgeMask that starts past block 0 needs the base's clean run")
            if self.start > start_of(self.graph, self.keep):
                raise ValueError(f"an EdgeMask starting at block {self.start} ablates an edge into an earlier block")
            before = [s for s in active if s < senders_before(self.graph, self.start)]
            copies = self.keep.shape[0]
            self._delta = [(self.clean.outputs[s] - self.ablated[s]).repeat(copies, 1, 1) for s in before]

    def _record(self, first: int) -> Hook:
        def fn(act: Tensor) -> None:
            parts = [act] if act.ndim == 3 else [act[:, :, h] for h in range(act.shape[2])]
            for k, a in enumerate(parts):
                slot = self._slot.get(first + k)
                if slot is not None:
                    abl = self._abl[slot]  # [b, pos, d]
                    self._delta.append((a.unflatten(0, (-1, abl.shape[0])) - abl).flatten(0, 1))
        return fn

    def _untouched(self, receivers: list[int]) -> bool:
        """True when every circuit keeps every edge into ``receivers`` and no probe is added: their inputs are the
        run's own stream, so the hook can leave the activation as it is (most hooks when one edge is ablated)."""
        return self.probe is None and not bool(self._drop[:, : len(self._delta), receivers].any())

    def _correction(self, receivers: list[int], x: Tensor) -> Tensor:
        """x − the ablated edges' share, for each receiver: [len(receivers), c*b, pos, d_model]."""
        n = len(self._delta)
        if n == 0:
            out = x.unsqueeze(0).expand(len(receivers), *x.shape)
        else:
            b = x.shape[0] // self.keep.shape[0]
            drop = self._drop[:, :n, receivers].repeat_interleave(b, 0)  # [c*b, n, r]
            delta = torch.stack(self._delta)  # [n, c*b, pos, d]
            out = x.unsqueeze(0) - torch.einsum("nsr,snpd->rnpd", drop.to(delta.dtype), delta)
        return out if self.probe is None else out + self.probe[receivers]

    def hooks(self, model: ModelRunner) -> dict[str, Hook]:
        g, hooks = self.graph, {}
        ridx = g.receiver_index
        hooks["blocks.0.hook_resid_pre"] = self._record(0)
        for L in range(g.n_layers):
            first = 1 + L * (g.n_heads + 1)
            hooks[f"blocks.{L}.attn.hook_result"] = self._record(first)
            hooks[f"blocks.{L}.hook_mlp_out"] = self._record(first + g.n_heads)
            hooks[f"blocks.{L}.hook_resid_pre"] = self._keeper(f"pre{L}", hooks.get(f"blocks.{L}.hook_resid_pre"))
            for x in QKV:
                recv = [ridx[f"a{L}.h{h}<{x}>"] for h in range(g.n_heads)]
                hooks[f"blocks.{L}.attn.hook_{x}"] = self._qkv(model, L, x, recv)
            if not model.arch.parallel:  # the MLP reads resid_mid (with a parallel residual, resid_pre)
                hooks[f"blocks.{L}.hook_resid_mid"] = self._keeper(f"mid{L}", None)
            hooks[f"blocks.{L}.mlp.hook_pre"] = self._mlp(model, L, ridx[f"m{L}"], linear=False)
            if model.layers[L].W_gate is not None:
                hooks[f"blocks.{L}.mlp.hook_pre_linear"] = self._mlp(model, L, ridx[f"m{L}"], linear=True)
        last = f"blocks.{g.n_layers - 1}.hook_resid_post"
        hooks[last] = self._keeper("final", None)
        logits = ridx["logits"]
        hooks["ln_final.hook_normalized"] = lambda act: None if self._untouched([logits]) else model.final_normalized(
            self._correction([logits], self._seen["final"])[0])
        return hooks

    def _keeper(self, key: str, then: Hook | None) -> Hook:
        def fn(act: Tensor) -> None:
            self._seen[key] = act
            if then is not None:
                then(act)
        return fn

    def _qkv(self, model: ModelRunner, L: int, which: str, recv: list[int]) -> Hook:
        def fn(act: Tensor) -> Tensor | None:
            if self._untouched(recv):
                return None
            inputs = self._correction(recv, self._seen[f"pre{L}"])  # [head, n, pos, d]
            h1 = model.norm1(L, inputs)
            w = model.layers[L]
            W, b = {"q": (w.W_Q, w.b_Q), "k": (w.W_K, w.b_K), "v": (w.W_V, w.b_V)}[which]
            return torch.einsum("hnpd,hde->nphe", h1, W) + b
        return fn

    def _mlp(self, model: ModelRunner, L: int, recv: int, linear: bool) -> Hook:
        def fn(act: Tensor) -> Tensor | None:
            if self._untouched([recv]):
                return None
            x = self._seen[f"pre{L}" if model.arch.parallel else f"mid{L}"]
            h2 = model.norm2(L, self._correction([recv], x)[0])
            return model.mlp_pre_linear(L, h2) if linear else model.mlp_pre(L, h2)
        return fn


def circuit_metric(runner: ModelRunner, graph: EdgeGraph, base: Tensor, ablated: Tensor, keep: Tensor,
                   ctx: MetricContext, metric: str = "logit_diff", chunk: int = 16,
                   clean: CleanRun | None = None) -> Tensor:
    """Per-example metric of each circuit: keep [c, S, R] (or [S, R]) -> [c, b], ``chunk`` circuits per forward.
    With the base's ``clean`` run, each forward starts at the first block its circuits change (``start_of``)."""
    keep = keep if keep.ndim == 3 else keep[None]
    out = []
    for i in range(0, keep.shape[0], chunk):
        k = keep[i:i + chunk]
        start = start_of(graph, k) if clean is not None else 0
        mask = EdgeMask(graph, k, ablated, start=start, clean=clean)
        resid = {start: clean.resid[start].repeat(k.shape[0], 1, 1)} if clean is not None and start > 0 else None
        logits = engine.run(runner, base.repeat(k.shape[0], 1), [mask], resid=resid,
                            start_at_layer=start if resid else None)
        out.append(evaluate(metric, logits, ctx))
    return torch.cat(out)


__all__ = ["CleanRun", "EdgeMask", "ablated_outputs", "circuit_metric", "clean_run", "sender_hooks", "sender_outputs",
           "senders_before", "start_of"]
