"""Faithfulness, completeness and minimality of a circuit, by resample ablation.

Components are attention heads and MLPs at each position.  "Ablating" a component replaces its
output with the output it has on another input of the task (resample ablation, one random
source input per base input for every ablated component).  Embeddings are never ablated.
Circuit sites map to components: a{L}.{H} / z / q / k / v / pattern -> head (L, H); attn{L} -> all
heads of L; m{L} / m{L}.post -> MLP L; residual-stream sites (x{L}.pre ...) are not components.

With acc(·) the accuracy of the answers (per target, and pooled over all targets):

    faithfulness             = acc(circuit only) / acc(full model)
    faithfulness_normalized  = (acc(circuit only) − acc(nothing)) / (acc(full) − acc(nothing))
    completeness             = (acc(full) − acc(full minus circuit)) / (acc(full) − acc(nothing))
    minimality[v]            = (acc(circuit) − acc(circuit minus v)) / (acc(full) − acc(nothing))

A circuit is complete when removing it destroys the behaviour (completeness near 1) and minimal
when every component node contributes (minimality[v] > ``min_contribution``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitkit.activations import resolve_positions
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site, parse_site
from circuitkit.verify.stats import estimate

HEAD_KINDS = {"head", "z", "q", "k", "v", "pattern"}
MLP_KINDS = {"mlp_out", "mlp_post"}


def is_component(site: Site) -> bool:
    return site.kind in HEAD_KINDS | MLP_KINDS | {"attn_out"}


def keep_masks(pm: ProbedModel, ids: Tensor, sites: Sequence[Site]) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: head keep [b, pos, heads] and MLP keep [b, pos] (True = not ablated)."""
    b, n = ids.shape
    heads = [torch.zeros(b, n, pm.n_heads, dtype=torch.bool) for _ in range(pm.n_layers)]
    mlps = [torch.zeros(b, n, dtype=torch.bool) for _ in range(pm.n_layers)]
    rows = torch.arange(b)
    for s in sites:
        if not is_component(s):
            continue
        pos = resolve_positions(pm.task, ids, s.position) if s.position is not None else None
        if s.kind in HEAD_KINDS:
            if pos is None:
                heads[s.layer][:, :, s.head] = True
            else:
                heads[s.layer][rows, pos, s.head] = True
        elif s.kind == "attn_out":
            if pos is None:
                heads[s.layer][:] = True
            else:
                heads[s.layer][rows, pos] = True
        else:
            if pos is None:
                mlps[s.layer][:] = True
            else:
                mlps[s.layer][rows, pos] = True
    return heads, mlps


@torch.no_grad()
def ablated_logits(pm: ProbedModel, ids: Tensor, src_cache: dict[str, Tensor], heads: list[Tensor],
                   mlps: list[Tensor]) -> Tensor:
    """Logits with every component whose keep mask is False replaced by the source's output."""
    dev = pm.device
    hooks = {}
    for L in range(pm.n_layers):
        hk, mk = heads[L].to(dev), mlps[L].to(dev)
        rn, mn = f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_mlp_out"
        hooks[rn] = (lambda act, k=hk, n=rn: torch.where(k.unsqueeze(-1), act, src_cache[n]))
        hooks[mn] = (lambda act, k=mk, n=mn: torch.where(k.unsqueeze(-1), act, src_cache[n]))
    return pm.runner.run(ids.to(dev), hooks=hooks)[0]


def _target_hits(pm: ProbedModel, ids: Tensor, logits: Tensor) -> dict[str, np.ndarray]:
    pred = logits.argmax(-1).cpu()
    out: dict[str, list[float]] = {}
    for i, row in enumerate(ids.tolist()):
        for t in pm.task.targets(pm.task.tokenizer.id_tokens(row)):
            out.setdefault(t.name, []).append(float(pred[i, t.position] == t.token))
    res = {k: np.array(v) for k, v in out.items()}
    res["all"] = np.concatenate(list(res.values())) if res else np.zeros(0)
    return res


@dataclass
class CircuitEvaluation:
    full: dict[str, float]
    empty: dict[str, float]
    circuit: dict[str, float]
    complement: dict[str, float]
    faithfulness: dict[str, float]
    faithfulness_normalized: dict[str, float]
    faithfulness_ci: dict[str, list[float]]
    completeness: dict[str, float]
    minimality: dict[str, dict[str, float]]  # node -> target -> normalized drop
    minimal: bool
    min_contribution: float
    n: int
    ignored_sites: list[str]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = _nan_to_none(asdict(self))
        d["definitions"] = __doc__.split("With acc")[1].strip()
        return d


def _nan_to_none(x: Any) -> Any:
    """NaN (a ratio with nothing to normalise by) is not JSON: write null instead."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _ratio(a: float, b: float) -> float:
    return float(a / b) if abs(b) > 1e-9 else float("nan")


def evaluate_circuit(pm: ProbedModel, sites: Sequence[Site | str], inputs: Sequence[str] | None = None,
                     n: int = 1000, seed: int = 0, min_contribution: float = 0.01) -> CircuitEvaluation:
    """Resample-ablation evaluation of the circuit made of ``sites`` (see the module docstring)."""
    task = pm.task
    sites = [parse_site(s) if isinstance(s, str) else s for s in sites]
    rng = random.Random(40_000 + seed)
    if inputs is None:
        inputs = task.generate(rng, n)
    inputs = list(inputs)[:n]
    ids = task.encode(inputs)
    perm = list(range(len(inputs)))
    rng.shuffle(perm)
    src_ids = ids[torch.tensor(perm)]
    names = [h for L in range(pm.n_layers) for h in (f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_mlp_out")]
    with torch.no_grad():
        full_logits, _ = pm.runner.run(ids.to(pm.device))
        _, src_cache = pm.runner.run(src_ids.to(pm.device), cache=names)

    def acc(keep_sites: Sequence[Site] | None, invert: bool = False) -> dict[str, np.ndarray]:
        if keep_sites is None:
            return _target_hits(pm, ids, full_logits)
        heads, mlps = keep_masks(pm, ids, keep_sites)
        if invert:
            heads, mlps = [~h for h in heads], [~m for m in mlps]
        return _target_hits(pm, ids, ablated_logits(pm, ids, src_cache, heads, mlps))

    comp = [s for s in sites if is_component(s)]
    full, empty, circ, compl = acc(None), acc([]), acc(comp), acc(comp, invert=True)
    mean = lambda d: {k: float(v.mean()) for k, v in d.items()}  # noqa: E731
    F_, E_, C_, M_ = mean(full), mean(empty), mean(circ), mean(compl)
    faith = {k: _ratio(C_[k], F_[k]) for k in F_}
    faith_n = {k: _ratio(C_[k] - E_[k], F_[k] - E_[k]) for k in F_}
    complete = {k: _ratio(F_[k] - M_[k], F_[k] - E_[k]) for k in F_}
    faith_ci = {}
    for k in F_:
        e = estimate(circ[k])
        faith_ci[k] = [_ratio(e.ci_low, F_[k]), _ratio(e.ci_high, F_[k])]
    minimality: dict[str, dict[str, float]] = {}
    uniq = list(dict.fromkeys(comp))
    for v in uniq:
        without = mean(acc([s for s in comp if s != v]))
        minimality[str(v)] = {k: _ratio(C_[k] - without[k], F_[k] - E_[k]) for k in F_}
    minimal = all(m.get("all", 0.0) > min_contribution for m in minimality.values()) if minimality else False
    ignored = [str(s) for s in sites if not is_component(s)]
    return CircuitEvaluation(F_, E_, C_, M_, faith, faith_n, faith_ci, complete, minimality, minimal,
                             min_contribution, len(inputs), ignored)


__all__ = ["is_component", "keep_masks", "ablated_logits", "CircuitEvaluation", "evaluate_circuit"]
