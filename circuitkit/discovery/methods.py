"""Circuit-discovery methods: each scores every edge of the model's edge graph, one signature, one registry.

=================  ===========================================================  =====================================
method             score of edge s → r                                          cost
=================  ===========================================================  =====================================
``eap``            (out_s − out_s^abl) · ∂m/∂input_r on the base                 1 forward + 1 backward
``eap-ig-inputs``  the same with the gradient averaged over ``steps`` runs whose  ``steps`` forwards + backwards
                   embeddings go from the ablation source's to the base's
``eap-ig-activations``  … over runs whose every sender output goes from its     ``steps`` forwards + backwards
                   ablated to its base value
``exact``          m(model) − m(model with s → r alone ablated)                  one forward per edge (batched),
                                                                                 from r's block on
``acdc``           ACDC (Conmy et al. 2023): edges tried in reverse topological  one forward per edge, in sequence
                   order, removed while KL(model ‖ circuit) grows by < τ; the  from r's block on
                   score is the KL increase its removal was measured at
=================  ===========================================================  =====================================

A score estimates how much the metric falls when the edge is ablated (positive: the edge supports the base's
answer), averaged over the base examples; with the IG methods' completeness the scores of all edges sum to
roughly m(model) − m(everything ablated).  EAP and EAP-IG follow Hanna et al. 2024; ``steps`` = 1 makes EAP-IG
equal to EAP.  ``acdc`` also returns the circuit it settled on (``DiscoveryResult.kept``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.discovery.edge_graph import EdgeGraph
from circuitkit.discovery.masked import CleanRun, EdgeMask, circuit_metric, clean_run
from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.models.runner import ModelRunner
from circuitkit.patching import engine
from circuitkit.patching.metrics import MetricContext, evaluate, set_clean_logits


@dataclass
class DiscoveryProblem:
    """What every method scores on: the model, its edge graph, base tokens [b, pos], every sender's ablated
    output [n_senders, b, pos, d_model] and the metric (name and per-base context)."""

    runner: ModelRunner
    graph: EdgeGraph
    base: Tensor
    ablated: Tensor
    ctx: MetricContext
    metric: str = "logit_diff"
    _clean: CleanRun | None = field(default=None, repr=False)

    def clean(self) -> CleanRun:
        """The base's own run: every sender's output and the residual stream entering each block (cached)."""
        if self._clean is None:
            self._clean = clean_run(self.runner, self.graph, self.base)
        return self._clean

    def clean_outputs(self) -> Tensor:
        """Every sender's output on the base: [n_senders, b, pos, d_model] (cached)."""
        return self.clean().outputs

    def forget_clean(self) -> None:
        """Drop the cached clean run, so that the next method computes it again (a timing then includes it)."""
        self._clean = None

    def kl_context(self) -> MetricContext:
        """The metric context with the base's own distribution recorded, for ``kl``."""
        with torch.no_grad():
            logits = self.runner.logits(self.base)
        ctx = MetricContext(self.ctx.positions, self.ctx.answer, self.ctx.wrong, None, self.ctx.target)
        set_clean_logits(ctx, logits)
        return ctx


@dataclass
class DiscoveryResult:
    """Edge scores [n_senders, n_receivers] (0 where no edge), the circuit a method chose itself (ACDC), and
    what it cost."""

    method: str
    scores: Tensor
    seconds: float
    settings: dict[str, Any]
    kept: Tensor | None = None


def receiver_gradients(p: DiscoveryProblem, interventions: list[Any]) -> Tensor:
    """∂(mean metric)/∂(each receiver's input) in a run of the base with ``interventions``: [R, b, pos, d_model]."""
    g = p.graph
    b, n_pos = p.base.shape
    probe = torch.zeros(len(g.receivers), b, n_pos, p.runner.d_model, requires_grad=True)
    mask = EdgeMask(g, g.full(), p.ablated, probe=probe)
    with torch.enable_grad():
        logits = engine.run(p.runner, p.base, [*interventions, mask])
        value = evaluate(p.metric, logits, p.ctx).sum()
        (grad,) = torch.autograd.grad(value, probe)
    return grad.detach()


def _scores_from(p: DiscoveryProblem, grad_sum: Tensor, steps: int) -> Tensor:
    """(out_s − out_s^abl) · mean gradient at r, summed over positions, averaged over bases: [S, R]."""
    delta = p.clean_outputs() - p.ablated  # [S, b, pos, d]
    s = torch.einsum("sbpd,rbpd->sr", delta, grad_sum / steps) / p.base.shape[0]
    return s * p.graph.real


def eap(p: DiscoveryProblem) -> DiscoveryResult:
    t0 = time.perf_counter()
    grad = receiver_gradients(p, [])
    return DiscoveryResult("eap", _scores_from(p, grad, 1), time.perf_counter() - t0, {})


def _ig(p: DiscoveryProblem, steps: int, blends: Callable[[float], list[Any]], name: str) -> DiscoveryResult:
    if steps < 1:
        raise CircuitkitError(f"integrated gradients need at least 1 step; got {steps}")
    t0 = time.perf_counter()
    total = None
    for k in range(1, steps + 1):
        grad = receiver_gradients(p, blends(k / steps))
        total = grad if total is None else total + grad
    assert total is not None
    return DiscoveryResult(name, _scores_from(p, total, steps), time.perf_counter() - t0, {"steps": steps})


def eap_ig_inputs(p: DiscoveryProblem, steps: int = 5) -> DiscoveryResult:
    """EAP-IG over the input embeddings: runs whose embeddings are abl + α (base − abl), α = k/steps."""
    x_clean, x_abl = p.clean_outputs()[0], p.ablated[0]
    return _ig(p, steps, lambda a: [engine.Blend("blocks.0.hook_resid_pre", torch.tensor(True),
                                                 x_abl + a * (x_clean - x_abl))], "eap-ig-inputs")


def eap_ig_activations(p: DiscoveryProblem, steps: int = 5) -> DiscoveryResult:
    """EAP-IG over activations (Hanna et al.'s ``ig-activations``): for each group of senders (the embeddings,
    a layer's heads, a layer's MLP) runs whose group output is abl + α (base − abl), α = k/steps, the rest live;
    the edges leaving the group take the gradients of those runs."""
    if steps < 1:
        raise CircuitkitError(f"integrated gradients need at least 1 step; got {steps}")
    t0 = time.perf_counter()
    g, clean, abl = p.graph, p.clean_outputs(), p.ablated
    delta = clean - abl  # [S, b, pos, d]
    yes = torch.tensor(True)
    groups: list[tuple[str, slice]] = [("blocks.0.hook_resid_pre", slice(0, 1))]
    for L in range(g.n_layers):
        first = 1 + L * (g.n_heads + 1)
        groups += [(f"blocks.{L}.attn.hook_result", slice(first, first + g.n_heads)),
                   (f"blocks.{L}.hook_mlp_out", slice(first + g.n_heads, first + g.n_heads + 1))]
    scores = torch.zeros(g.shape)
    for hook, rows in groups:
        total = None
        for k in range(1, steps + 1):
            mix = abl[rows] + (k / steps) * delta[rows]  # [n, b, pos, d]
            value = mix.permute(1, 2, 0, 3) if hook.endswith("hook_result") else mix[0]
            grad = receiver_gradients(p, [engine.Blend(hook, yes, value)])
            total = grad if total is None else total + grad
        assert total is not None
        scores[rows] = torch.einsum("sbpd,rbpd->sr", delta[rows], total / steps) / p.base.shape[0]
    return DiscoveryResult("eap-ig-activations", scores * g.real, time.perf_counter() - t0, {"steps": steps})


@torch.no_grad()
def exact(p: DiscoveryProblem, chunk: int = 16, from_receiver: bool = True,
          edges: Sequence[tuple[int, int]] | None = None, progress: bool | None = None) -> DiscoveryResult:
    """Each edge ablated alone: m(model) − m(model without the edge), averaged over bases.  Edges are taken by
    receiver, so a chunk's circuits differ from the model only from the receivers' block on, where its forward
    starts (``masked.start_of``; ``from_receiver`` False runs every forward from the embeddings, the reference
    the benchmark times it against); the masks are built a chunk at a time.  ``edges`` (sender, receiver) index
    pairs score only those (the rest stay 0); ``progress`` shows a bar (None: on a terminal only)."""
    t0 = time.perf_counter()
    g, clean = p.graph, p.clean() if from_receiver else None
    todo = g.real.nonzero().tolist() if edges is None else [list(e) for e in edges]
    bad = [e for e in todo if not g.real[e[0], e[1]]]
    if bad:
        raise CircuitkitError(f"{len(bad)} of the edges to score are not edges of the graph (first: sender "
                              f"{bad[0][0]}, receiver {bad[0][1]}); valid pairs are g.real.nonzero()")
    todo.sort(key=lambda e: (e[1], e[0]))  # by receiver: a chunk touches few
    full = circuit_metric(p.runner, g, p.base, p.ablated, g.full(), p.ctx, p.metric).mean()
    scores = torch.zeros(g.shape)
    bar = tqdm(total=len(todo), desc="exact", unit="edge", disable=None if progress is None else not progress)
    for at in range(0, len(todo), chunk):
        part = todo[at:at + chunk]
        masks = g.full().unsqueeze(0).repeat(len(part), 1, 1)
        for n, (i, j) in enumerate(part):
            masks[n, i, j] = False
        vals = circuit_metric(p.runner, g, p.base, p.ablated, masks, p.ctx, p.metric, chunk=chunk,
                              clean=clean).mean(1)
        for n, (i, j) in enumerate(part):
            scores[i, j] = full - vals[n]
        bar.update(len(part))
    bar.close()
    return DiscoveryResult("exact", scores, time.perf_counter() - t0, {"from_receiver": from_receiver,
                                                                      "edges": len(todo)})


def acdc_order(g: EdgeGraph) -> list[tuple[int, int]]:
    """Edges in ACDC's order: receivers from the logits back to the first layer (a layer's MLP before its
    heads), each receiver's senders from the latest to the earliest."""
    def rank(j: int) -> tuple[int, int]:
        r = g.receivers[j]
        return (-r.layer, 0 if r.kind in ("logits", "mlp") else 1)
    recv = sorted(range(len(g.receivers)), key=lambda j: (rank(j), j))
    return [(i, j) for j in recv for i in reversed(range(len(g.senders))) if g.real[i, j]]


@torch.no_grad()
def acdc(p: DiscoveryProblem, tau: float = 0.01) -> DiscoveryResult:
    """ACDC: remove each edge in ``acdc_order`` whose removal raises KL(model ‖ circuit) by less than ``tau``."""
    if tau < 0:
        raise CircuitkitError(f"ACDC's threshold tau must be >= 0; got {tau}")
    t0 = time.perf_counter()
    g, ctx = p.graph, p.kl_context()
    keep = g.full()
    kl_now = float(circuit_metric(p.runner, g, p.base, p.ablated, keep, ctx, "kl").mean())
    scores = torch.zeros(g.shape)
    clean = p.clean()  # the order ablates edges into later blocks first: earlier blocks run as the model's
    for i, j in acdc_order(g):
        keep[i, j] = False
        kl_new = float(circuit_metric(p.runner, g, p.base, p.ablated, keep, ctx, "kl", clean=clean).mean())
        scores[i, j] = kl_new - kl_now
        if kl_new - kl_now < tau:
            kl_now = kl_new
        else:
            keep[i, j] = True
    return DiscoveryResult("acdc", scores, time.perf_counter() - t0, {"tau": tau, "kl": kl_now}, kept=keep)


#: method name -> fn(problem, **settings) -> DiscoveryResult
METHODS: dict[str, Callable[..., DiscoveryResult]] = {
    "eap": eap, "eap-ig-inputs": eap_ig_inputs, "eap-ig-activations": eap_ig_activations, "exact": exact,
    "acdc": acdc,
}


def discover(p: DiscoveryProblem, method: str, **settings: Any) -> DiscoveryResult:
    """Score every edge with ``method`` (see ``METHODS``)."""
    if method not in METHODS:
        raise CircuitkitError(f"unknown discovery method {method!r}; valid: {choices_hint(METHODS)}")
    return METHODS[method](p, **settings)


__all__ = ["METHODS", "DiscoveryProblem", "DiscoveryResult", "acdc", "acdc_order", "discover", "eap",
           "eap_ig_activations", "eap_ig_inputs", "exact", "receiver_gradients"]
