"""The one intervention engine: a set of typed interventions applied to one forward pass.

Every patching method in circuitkit — node patching, cumulative groups, sweeps, path patching, circuit
evaluation, the discovery baselines and attribution's exact checks — describes *what* it changes as
interventions and calls ``run``; only this module turns them into the model runner's hooks.

| intervention | what it does at its hook | used by |
|---|---|---|
| ``Patch(site, positions, value)`` | writes a value (source, mean or zero) into a site at a position per example | node, groups, path (sender) |
| ``Blend(hook, take, value)`` | ``torch.where(take, value, act)``: a mask picks which rows / heads take the value | sweeps (a cell per batch row), circuit evaluation (ablated components), path (frozen components) |
| ``Record(names, out)`` | stores the named activations in ``out`` (changes nothing) | every caller that reads a cache |
| ``path.ReceiverInput`` | recomputes one receiver's input from the residual stream plus a sender's change | path patching |

Several interventions on one hook apply in the order given.  ``run`` starts the forward at the deepest block
whose input the caller supplies (``resid``, the base's residual streams by layer) and that no intervention
precedes, so a patch in block 3 does not recompute blocks 0–2; the incremental shortcuts that recompute only
the rows a patch can change (sweeps, circuit evaluation) use the runner's row maths (``ModelRunner.block_at_rows``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from circuitkit.models.runner import Hook, ModelRunner
from circuitkit.sites import Site

Metric = Callable[[Tensor], Tensor]  # logits [b, pos, vocab] -> per-example values [b]


@runtime_checkable
class Intervention(Protocol):
    """What ``run`` needs of an intervention: the first block it changes and its hooks."""

    @property
    def layer(self) -> int:
        """The first block whose computation the intervention changes (0: the embeddings)."""
        ...

    def hooks(self, model: ModelRunner) -> Mapping[str, Hook]:
        """Runner hooks (hook name -> fn(activation) -> replacement or None)."""
        ...


def hook_layer(hook: str) -> int:
    """The block a TransformerLens hook name belongs to (0 for the embeddings, past the last for ln_final)."""
    if hook.startswith("blocks."):
        return int(hook.split(".")[1])
    return 10**9 if hook.startswith("ln_final") else 0


@dataclass
class Patch:
    """Write ``value`` into ``site``'s hook at ``positions`` of every base example.

    positions: [b] indices (pattern sites: the query/destination position), or None = all.
    value: site.select-shaped, [b, d] with positions ([b, key_pos] for pattern), else [b, pos, d].
    """

    site: Site
    positions: Tensor | None
    value: Tensor

    @property
    def hook_name(self) -> str:
        return self.site.hook_name

    @property
    def layer(self) -> int:
        return 0 if self.site.kind in ("emb", "pos") or self.site.layer is None else self.site.layer

    def hooks(self, model: ModelRunner) -> dict[str, Hook]:
        return {self.hook_name: self.apply}

    def apply(self, act: Tensor) -> Tensor:
        """The hook's activation [b, ...] with the value written at the site's positions (a copy)."""
        act = act.clone()
        b = self.value.shape[0]
        if act.shape[0] != b:
            raise ValueError(f"patch for {b} examples cannot apply to a batch of {act.shape[0]}")
        value = self.value.to(act.device, act.dtype)
        rows = torch.arange(b, device=act.device)
        pos = None if self.positions is None else self.positions.to(act.device)
        s = self.site
        if s.kind == "pattern":
            at: tuple = (slice(None), s.head) if pos is None else (rows, s.head, pos)
        elif s.head is not None:
            at = (slice(None), slice(None), s.head) if pos is None else (rows, pos, s.head)
        else:
            at = (slice(None),) if pos is None else (rows, pos)
        act[at] = value
        return act


@dataclass
class Blend:
    """At ``hook``, take ``value`` where ``take`` holds and keep the run's own activation elsewhere.

    take: bool, broadcastable to the activation (e.g. [b, pos, head, 1] for hook_z); value: broadcastable too."""

    hook: str
    take: Tensor
    value: Tensor

    @property
    def layer(self) -> int:
        return hook_layer(self.hook)

    def hooks(self, model: ModelRunner) -> dict[str, Hook]:
        return {self.hook: lambda act: torch.where(self.take, self.value, act)}


@dataclass
class Record:
    """Store the activations at ``names`` (after any other intervention there) in ``out``; changes nothing."""

    names: Sequence[str]
    out: MutableMapping[str, Tensor]

    @property
    def layer(self) -> int:
        return 10**9  # recording needs no earlier start

    def hooks(self, model: ModelRunner) -> dict[str, Hook]:
        def keep(name: str) -> Hook:
            return lambda act: self.out.__setitem__(name, act)
        return {n: keep(n) for n in self.names}


def _chain(fns: list[Hook]) -> Hook:
    """One hook applying ``fns`` in order (a returned tensor replaces the activation for the next)."""
    if len(fns) == 1:
        return fns[0]

    def fn(act: Tensor) -> Tensor:
        for f in fns:
            y = f(act)
            if y is not None:
                act = y
        return act
    return fn


def compose(model: ModelRunner, interventions: Sequence[Intervention]) -> dict[str, Hook]:
    """The runner hooks of ``interventions``, those sharing a hook chained in order."""
    by_hook: dict[str, list[Hook]] = {}
    for iv in interventions:
        for name, fn in iv.hooks(model).items():
            by_hook.setdefault(name, []).append(fn)
    return {name: _chain(fns) for name, fns in by_hook.items()}


def start_layer(interventions: Sequence[Intervention], resid: Mapping[int, Tensor] | None) -> int:
    """The deepest block at or before every intervention whose input ``resid`` supplies (0: the embeddings)."""
    if not resid:
        return 0
    first = min((iv.layer for iv in interventions if not isinstance(iv, Record)), default=10**9)
    return max((L for L in resid if 0 < L <= first), default=0)


def run(model: ModelRunner, base: Tensor, interventions: Sequence[Intervention] = (), metric: Metric | None = None,
        *, resid: Mapping[int, Tensor] | None = None, start_at_layer: int | None = None,
        stop_at_layer: int | None = None, need_logits: bool = True) -> Tensor | None:
    """One forward pass of ``base`` [b, pos] token ids with ``interventions``; returns ``metric(logits)`` (or the
    logits [b, pos, vocab] without a metric; None when the run stops early or ``need_logits`` is False, for runs
    that only ``Record``).

    resid: the base's residual stream entering blocks, by layer ({L: [b, pos, d_model]}); the run starts at the
    deepest one that no intervention precedes (``start_layer``), or at ``start_at_layer`` when the caller knows
    the blocks below are unchanged (then ``resid`` must hold that layer, unless it is 0)."""
    start = start_layer(interventions, resid) if start_at_layer is None else start_at_layer
    x = resid.get(start) if resid is not None and start > 0 else None  # at block 0 the run embeds the tokens
    if start > 0 and x is None:
        raise ValueError(f"start_at_layer={start} needs the residual stream entering block {start} in resid")
    logits, _ = model.run(base, hooks=compose(model, interventions), stop_at_layer=stop_at_layer,
                          start_at_layer=start, resid=x, return_logits=need_logits)
    if logits is None:
        return None
    return logits if metric is None else metric(logits)


__all__ = ["Blend", "Intervention", "Metric", "Patch", "Record", "compose", "hook_layer", "run", "start_layer"]
