"""Where patched-in values come from: zero, mean over a reference set, resample, interchange.

``build_patches`` turns sites (each with a position) into ``Patch`` objects holding the value to
write at each base example's resolved position.  Named positions are resolved per input, for
base and source separately, so a source of a different length is legitimate; raw integer
positions with base/source of different (unpadded) lengths are an error.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.engine import Patch
from circuitkit.sites import Site, check_site
from circuitkit.tasks.base import Task

PositionSpec = str | int | Tensor | None


class Ablation(str, Enum):  # noqa: UP042 - StrEnum would change str(Ablation.X) in reports
    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"
    INTERCHANGE = "interchange"


ABLATIONS = tuple(a.value for a in Ablation)


def get_ablation(name: str | Ablation) -> Ablation:
    try:
        return Ablation(name)
    except ValueError:
        raise CircuitkitError(f"unknown ablation {name!r}; valid: {choices_hint(ABLATIONS)}") from None


def as_ids(task: Task, inputs: Sequence[str] | Tensor, what: str = "inputs") -> Tensor:
    """Token ids [b, seq_len] from texts or ids."""
    if isinstance(inputs, Tensor):
        if inputs.ndim != 2:
            raise CircuitkitError(f"{what}: token ids must be [batch, pos], got shape {tuple(inputs.shape)}")
        return inputs.long()
    if isinstance(inputs, str):
        inputs = [inputs]
    if len(inputs) == 0:
        raise CircuitkitError(f"{what}: no inputs given")
    return task.encode(list(inputs))


def lengths(task: Task, ids: Tensor) -> Tensor:
    """Unpadded length of each row [b]."""
    return (ids != task.vocab.pad_id).sum(-1)


def resolve(task: Task, ids: Tensor, position: PositionSpec, what: str = "base") -> Tensor | None:
    """[b] indices of ``position`` in each row (named positions per input), or None for all positions."""
    if position is None:
        return None
    if isinstance(position, Tensor):
        if position.shape != (ids.shape[0],):
            raise CircuitkitError(f"{what}: per-example positions must have shape [{ids.shape[0]}], "
                                  f"got {tuple(position.shape)}")
        bad = (position < 0) | (position >= ids.shape[1])
        if bad.any():
            raise CircuitkitError(f"{what}: positions {position[bad].tolist()} are out of range 0..{ids.shape[1] - 1}")
        return position.long()
    return task.position_indices(ids, position)


def is_raw(position: PositionSpec) -> bool:
    return position is not None and not isinstance(position, Tensor) and (
        isinstance(position, int) or str(position).lstrip("-").isdigit())


def check_pairing(task: Task, base_ids: Tensor, source_ids: Tensor, raw_positions: bool) -> None:
    """Base and source must pair up one to one; raw positions need equal lengths."""
    if source_ids.shape[0] != base_ids.shape[0]:
        raise CircuitkitError(f"base has {base_ids.shape[0]} inputs but source has {source_ids.shape[0]}; "
                              "interchange pairs them one to one")
    if source_ids.shape[1] != base_ids.shape[1]:
        raise CircuitkitError(f"base and source have different padded lengths ({base_ids.shape[1]} vs "
                              f"{source_ids.shape[1]}); are they from the same task?")
    if raw_positions:
        lb, ls = lengths(task, base_ids), lengths(task, source_ids)
        bad = (lb != ls).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise CircuitkitError(
                f"{len(bad)} base/source pairs differ in length (e.g. {task.decode(base_ids[i])!r} vs "
                f"{task.decode(source_ids[i])!r}) and an integer position cannot align them; use a named "
                f"position ({choices_hint(task.position_names)}) or same-length sources")


def validate_sites(pm: ProbedModel, sites: Sequence[Site]) -> None:
    for s in sites:
        check_site(s, pm.n_layers, pm.n_heads)


def resample_sources(reference_ids: Tensor, base_ids: Tensor, seed: int) -> Tensor:
    """One random reference row per base row, a different input where possible."""
    rng = random.Random(seed)
    n = reference_ids.shape[0]
    rows = []
    for b in base_ids:
        for _ in range(20):
            j = rng.randrange(n)
            if not torch.equal(reference_ids[j], b):
                break
        rows.append(j)
    return reference_ids[torch.tensor(rows)]


@torch.no_grad()
def build_patches(
    pm: ProbedModel,
    base_ids: Tensor,
    sites: Sequence[Site],
    ablation: str | Ablation = Ablation.INTERCHANGE,
    source_ids: Tensor | None = None,
    reference_ids: Tensor | None = None,
    seed: int = 0,
    base_positions: Sequence[PositionSpec] | None = None,
    source_positions: Sequence[PositionSpec] | None = None,
) -> list[Patch]:
    """One ``Patch`` per site.

    Positions default to each site's ``.position`` (resolved per input); ``base_positions`` /
    ``source_positions`` override them per site (e.g. [b] index tensors).  ``reference_ids``
    feed ``mean`` (averaged) and ``resample`` (drawn from); they default to the base batch.
    """
    task, ab = pm.task, get_ablation(ablation)
    validate_sites(pm, sites)
    bpos_specs = list(base_positions) if base_positions is not None else [s.position for s in sites]
    spos_specs = list(source_positions) if source_positions is not None else bpos_specs
    if len(bpos_specs) != len(sites) or len(spos_specs) != len(sites):
        raise CircuitkitError("give one base and one source position per site")
    if ab is Ablation.RESAMPLE:
        ref = base_ids if reference_ids is None else reference_ids
        source_ids, ab = resample_sources(ref, base_ids, seed), Ablation.INTERCHANGE
    if ab is Ablation.INTERCHANGE:
        if source_ids is None:
            raise CircuitkitError("interchange patching needs source inputs (one per base input)")
        check_pairing(task, base_ids, source_ids, any(is_raw(p) for p in spos_specs))
    hooks = sorted({s.hook_name for s in sites})
    stop = max(s.stop_layer for s in sites)
    stop_at = None if stop >= pm.n_layers else stop
    run_ids = {Ablation.INTERCHANGE: source_ids, Ablation.MEAN: reference_ids if reference_ids is not None else base_ids,
               Ablation.ZERO: base_ids[:1]}[ab]
    _, cache = pm.runner.run(run_ids.to(pm.device), cache=hooks, stop_at_layer=stop_at, return_logits=False)
    patches = []
    for s, bspec, sspec in zip(sites, bpos_specs, spos_specs):
        bpos = resolve(task, base_ids, bspec, "base")
        spos = resolve(task, run_ids, sspec, "source")
        if (bpos is None) != (spos is None):
            raise CircuitkitError(f"site {s}: base and source must both have a position or both cover all")
        src = s.select(cache[s.hook_name], spos)
        if ab is Ablation.INTERCHANGE:
            value = src
        elif ab is Ablation.MEAN:
            value = src.mean(0, keepdim=True).expand(base_ids.shape[0], *src.shape[1:]).clone()
        else:  # zero
            value = torch.zeros(base_ids.shape[0], *src.shape[1:], dtype=src.dtype, device=src.device)
        patches.append(Patch(s.at(None), bpos, value))
    return patches
