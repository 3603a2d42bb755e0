"""Batched sweeps: patch every (layer, position[, head]) cell of one component kind.

Equal to ``transformer_lens.patching.get_act_patch_*`` (same cells, same order of axes) but many
patches share one forward: for layer L, the base run's ``blocks.L.hook_resid_pre`` is replicated
``k`` times along the batch ([k*b, pos, d_model]), the forward starts at block L, and copy ``i``
gets cell ``i``'s patch.  The base and source caches are computed once.  Kinds whose patch at position p
only rewrites row p of the residual stream (``ROW_DIRECT``: head/z, attn_out, mlp_out, resid_mid/post) go
further and recompute only what the patch can change: block L for row p alone, the blocks between in full,
and the last block at the answer row from the base's keys, values and leave-one-out attention sums
(``_AnswerRowBlock``), which is exact up to float rounding.

Mapping to TransformerLens: their corrupted tokens = our base, their clean cache = our source.
Kinds and their TL counterparts (output axes):
    resid_pre, resid_mid, attn_out, mlp_out   get_act_patch_<kind>              (layer, pos)
    resid_post                                 (none)                            (layer, pos)
    head (= z; per-head result is z @ W_O)     get_act_patch_attn_head_out_by_pos (layer, pos, head)
    z, q, k, v                                 get_act_patch_attn_head_<q|k|v>_by_pos (layer, pos, head)
    pattern                                    get_act_patch_attn_head_pattern_by_pos (layer, head, dest_pos)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit import shards
from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.runner import ModelRunner
from circuitkit.patching import engine
from circuitkit.patching.ablations import Ablation, as_ids, check_pairing, get_ablation, resample_sources
from circuitkit.patching.engine import Blend, Record
from circuitkit.patching.metrics import MetricContext, evaluate, metric_context, set_clean_logits
from circuitkit.patching.node import resid_names
from circuitkit.results import JsonResult
from circuitkit.sites import KINDS
from circuitkit.stats import bootstrap_ci
from circuitkit.tasks.base import Task

_AXES: dict[str, tuple[str, ...]] = {
    **{k: ("layer", "pos") for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")},
    **{k: ("layer", "pos", "head") for k in ("head", "z", "q", "k", "v")},
    "pattern": ("layer", "head", "dest_pos"),
}
#: a head's result is z @ W_O, so a "head" sweep patches z (the same change, without forming [b, pos, head, d_model])
_PATCHED_AS = {"head": "z"}
#: kind -> (hook, output axes); the hooks are the site table's (``circuitkit.sites.KINDS``)
SWEEP_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    k: (KINDS[_PATCHED_AS.get(k, k)].hook, axes) for k, axes in _AXES.items()}


# kinds whose patch at position p changes only row p of the residual stream within its own block
ROW_LOCAL = frozenset({"resid_mid", "resid_post", "attn_out", "mlp_out", "head", "z", "q", "pattern"})
# row-local kinds whose patched value gives row p's new residual stream directly (``_patched_row``), so the
# patched block is computed for that row alone
ROW_DIRECT = frozenset({"resid_mid", "resid_post", "attn_out", "mlp_out", "head", "z"})


@dataclass
class SweepResult(JsonResult):
    """values: [*axes, b] per-example metric after each cell's patch; base: [b] unpatched."""

    kind: str
    axis_names: tuple[str, ...]
    values: Tensor
    base: Tensor
    metric: str
    ablation: str
    context: MetricContext = field(repr=False)

    def mean(self) -> Tensor:
        """[*axes] mean over examples (what TransformerLens returns)."""
        return self.values.mean(-1)

    def effect(self) -> Tensor:
        """[*axes, b] base - patched."""
        return self.base - self.values

    def ci(self, confidence: float = 0.95, n_resamples: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        return bootstrap_ci(self.values, confidence, n_resamples)

    def to_dict(self, with_ci: bool = True) -> dict:
        d = {"kind": self.kind, "axes": list(self.axis_names), "shape": list(self.values.shape[:-1]),
             "metric": self.metric, "ablation": self.ablation, "n": int(self.values.shape[-1]),
             "base_mean": float(self.base.mean()), "mean": self.mean().tolist()}
        if with_ci:
            lo, hi = self.ci()
            d["ci_low"], d["ci_high"] = lo.tolist(), hi.tolist()
        return d


def _cell_mask(kind: str, cells: Tensor, act_shape: torch.Size, device: torch.device) -> Tensor:
    """Bool [n, *act_shape[1:-1], 1] marking row i's patched cell ``cells[i]`` (broadcast over features)."""
    n = cells.shape[0]
    ar = torch.arange(n, device=device)
    m = torch.zeros(n, *act_shape[1:-1], 1, dtype=torch.bool, device=device)
    if cells.shape[1] == 2:  # (pos, head) for [b, pos, head, d]; (head, dest) for pattern [b, head, q, key]
        m[ar, cells[:, 0], cells[:, 1]] = True
    else:  # (pos,) for [b, pos, d]
        m[ar, cells[:, 0]] = True
    return m


def _cell_pos(kind: str, cells: Tensor) -> Tensor:
    """The sequence position each cell patches ([n])."""
    return cells[:, 1] if kind == "pattern" else cells[:, 0]


def _last_block_at(runner: ModelRunner, x: Tensor, t: Tensor) -> Tensor:
    """The last block and the unembedding for row ``t`` only: x [n, pos, d_model] (the last block's
    resid_pre), t [n] -> logits [n, 1, vocab] (``ModelRunner.block_at_rows``)."""
    return runner.unembed(runner.block_at_rows(runner.n_layers - 1, x, t)).unsqueeze(1)


def _patched_row(runner: ModelRunner, kind: str, L: int, base_cache: dict[str, Tensor], src: Tensor, bas: Tensor,
                 ex: Tensor, cell: Tensor) -> Tensor:
    """Block ``L``'s resid_post at the patched row only, for a ``ROW_DIRECT`` kind: [m, d_model] for the
    (example ``ex``, cell) pairs.  The rest of the block's output is the base's (the patch is row-local).
    src / bas: the kind's source and base activations [b, pos(, head), d]."""
    p = cell[:, 0]
    post = base_cache[f"blocks.{L}.hook_resid_post"][ex, p]  # [m, d_model]
    if kind == "resid_post":
        return src[ex, p]
    if kind == "mlp_out":
        return post + (src[ex, p] - bas[ex, p])
    pre, mid = base_cache[f"blocks.{L}.hook_resid_pre"][ex, p], base_cache[f"blocks.{L}.hook_resid_mid"][ex, p]
    if kind == "resid_mid":
        new_mid = src[ex, p]
    elif kind == "attn_out":
        new_mid = mid + (src[ex, p] - bas[ex, p])
    else:  # head / z: one head's z at row p -> its share of attn_out
        h = cell[:, 1]
        dz = src[ex, p, h] - bas[ex, p, h]  # [m, d_head]
        new_mid = mid + torch.einsum("me,med->md", dz, runner.layers[L].W_O[h])
    return new_mid + runner.mlp(L, runner.norm2(L, runner.mlp_input(L, pre, new_mid)))


class _AnswerRowBlock:
    """The last block at each example's answer row t when its input differs from the base's in one row p <= t.

    Built once from the base: keys and values of every row, the query at t, and per key j the *leave-one-out*
    softmax sums Σ_{k≠j} w_k and Σ_{k≠j} w_k v_k (w_k = exp(score_k − max), from exclusive prefix and suffix
    sums: no subtraction, so no cancellation when one key holds all the attention).  A patch then needs row
    p's new key and value only: z = (LOO_wv[p] + w'_p v'_p) / (LOO_w[p] + w'_p), exact up to rounding.  A
    patch at the answer row itself (p = t) changes the query as well and runs ``block_at_rows``."""

    def __init__(self, runner: ModelRunner, x: Tensor, t: Tensor) -> None:
        L = runner.n_layers - 1
        self.runner, self.L, self.x, self.t = runner, L, x, t  # x: [b, pos, d_model] (the last block's resid_pre)
        rows, pos = torch.arange(x.shape[0], device=x.device), torch.arange(x.shape[1], device=x.device)
        h1 = runner.norm1(L, x)
        k, v = runner.keys_values(L, h1, pos)  # [b, pos, head, d_head]
        self.q = runner.query_at(L, h1[rows, t], t)  # [b, head, d_head]
        scores = runner.row_scores(self.q, k, t)  # [b, head, pos] (after t: the dtype's minimum)
        self.max = scores.max(-1).values  # [b, head]
        w = torch.exp(scores - self.max[..., None])  # [b, head, pos] (0 after t)
        wv = w[..., None] * v.transpose(1, 2)  # [b, head, pos, d_head]
        self.loo_w = self._exclusive(w, -1)
        self.loo_wv = self._exclusive(wv, -2)

    @staticmethod
    def _exclusive(a: Tensor, dim: int) -> Tensor:
        """Σ over every other index along ``dim`` (exclusive prefix + exclusive suffix sums)."""
        zero = torch.zeros_like(a.narrow(dim, 0, 1))
        prefix = torch.cat([zero, a.narrow(dim, 0, a.shape[dim] - 1).cumsum(dim)], dim)
        rev = a.flip(dim)
        suffix = torch.cat([zero, rev.narrow(dim, 0, a.shape[dim] - 1).cumsum(dim)], dim).flip(dim)
        return prefix + suffix

    def logits(self, ex: Tensor, p: Tensor, row: Tensor) -> Tensor:
        """Logits [m, vocab] at the answer rows of examples ``ex`` whose last-block input has row ``p``
        replaced by ``row`` [m, d_model]."""
        r, L = self.runner, self.L
        t = self.t[ex]
        out = torch.empty_like(row)
        full = p == t  # the answer row itself: a new query too
        o = (~full).nonzero().squeeze(1)
        if o.numel():
            e, pp = ex[o], p[o]
            kp, vp = r.keys_values(L, r.norm1(L, row[o]).unsqueeze(1), pp[:, None])  # [m, 1, head, d_head]
            kp, vp = kp.squeeze(1), vp.squeeze(1)
            sp = r.scale((self.q[e] * kp).sum(-1))  # [m, head]
            top = torch.maximum(self.max[e], sp)
            keep, wp = torch.exp(self.max[e] - top), torch.exp(sp - top)
            heads = torch.arange(sp.shape[1], device=sp.device)
            loo_w = self.loo_w[e[:, None], heads[None, :], pp[:, None]]  # [m, head]
            loo_wv = self.loo_wv[e[:, None], heads[None, :], pp[:, None]]  # [m, head, d_head]
            den = loo_w * keep + wp
            ok = (den > 1e-30).all(-1)  # else every weight underflowed against the base's max: recompute
            z = (loo_wv * keep[..., None] + wp[..., None] * vp) / den.clamp_min(1e-30)[..., None]
            out[o[ok]] = r.row_from_z(L, self.x[e[ok], t[o[ok]]], z[ok])
            full[o[~ok]] = True
        if bool(full.any()):
            x = self.x[ex[full]].clone()
            x[torch.arange(int(full.sum()), device=x.device), p[full]] = row[full]
            out[full] = r.block_at_rows(L, x, t[full])
        return r.unembed(out)


class _SuffixBlocks:
    """The blocks after a patched block ``L`` in a causal model, for the rows a patch at row p can change (p and
    after) only: rows before p keep the base's values, so their keys and values are the base's, computed once
    here for every layer ([b, pos, head, d_head]), and each block runs on rows p.. with them as a KV cache
    (``ModelRunner.block_suffix``); the last block then runs for the answer row alone."""

    def __init__(self, runner: ModelRunner, base_cache: dict[str, Tensor], n_keep: int, t: Tensor) -> None:
        self.runner, self.base_cache, self.n_keep, self.t = runner, base_cache, n_keep, t
        pos = torch.arange(n_keep, device=t.device)
        self.kv = {L: runner.keys_values(L, runner.norm1(L, base_cache[f"blocks.{L}.hook_resid_pre"][:, :n_keep]), pos)
                   for L in range(1, runner.n_layers)}  # block 0 is never after a patched block

    def logits(self, L: int, ex: Tensor, p: Tensor, row: Tensor) -> Tensor:
        """Logits [m, vocab] at the answer rows of examples ``ex`` whose block-``L`` output has row ``p`` [m]
        replaced by ``row`` [m, d_model]; pairs that share p run together (rows p.. of every block after L)."""
        out = torch.empty(row.shape[0], self.runner.W_U.shape[0], dtype=row.dtype, device=row.device)
        for s in p.unique().tolist():
            i = (p == s).nonzero().squeeze(1)
            out[i] = self._from(L, ex[i], s, row[i])
        return out

    def _from(self, L: int, ex: Tensor, s: int, row: Tensor) -> Tensor:
        """Logits [m, vocab] for pairs that all patch row ``s``: rows s.. of blocks L+1 .. last-1, then the answer row."""
        r, last = self.runner, self.runner.n_layers - 1
        x = self.base_cache[f"blocks.{L}.hook_resid_post"][ex, s:self.n_keep].clone()  # [m, n_keep - s, d_model]
        x[:, 0] = row
        for layer in range(L + 1, last):
            k, v = self.kv[layer]
            x = r.block_suffix(layer, x, k[ex, :s], v[ex, :s])
        k, v = self.kv[last]  # the answer row t >= s: cells lie at or before the answer
        return r.unembed(r.block_at_rows(last, x, self.t[ex], k[ex, :s], v[ex, :s]))


def _truncate(kind: str, act: Tensor, n_pos: int) -> Tensor:
    return act[:, :, :n_pos, :n_pos] if kind == "pattern" else act[:, :n_pos]


@dataclass(frozen=True)
class _SweepPlan:
    """What every patched forward of one sweep shares, computed once from the base run."""

    runner: ModelRunner
    kind: str
    metric: str
    hooks: list[str]  # the kind's hook name per layer
    base_cache: dict[str, Tensor]  # the base run's activations (cut to n_keep positions)
    ids_cut: Tensor  # [b, n_keep] base tokens up to the last answer position
    t_pos: Tensor  # [b] answer positions (on the device)
    n_keep: int
    device: torch.device
    direct: bool  # ROW_DIRECT kind with ``incremental``: the patched block runs for the patched row only
    answer_block: _AnswerRowBlock | None
    suffix: _SuffixBlocks | None  # direct kinds in a causal model with blocks between the patched and the last
    max_rows: int


def _resolve_sources(task: Task, ab: Ablation, base_ids: Tensor, source: Sequence[str] | Tensor | None,
                     reference: Sequence[str] | Tensor | None, seed: int) -> tuple[Tensor | None, Ablation]:
    """Source ids [b, pos] (or None) and the ablation actually run: resampling draws sources from the
    reference and runs as an interchange; an interchange needs sources paired with the base inputs."""
    src_ids = None if source is None else as_ids(task, source, "source")
    if ab is Ablation.RESAMPLE:
        ref = base_ids if reference is None else as_ids(task, reference, "reference")
        src_ids, ab_eff = resample_sources(ref, base_ids, seed), Ablation.INTERCHANGE
    else:
        ab_eff = ab
    if ab_eff is Ablation.INTERCHANGE:
        if src_ids is None:
            raise CircuitkitError("interchange sweeps need source inputs (one per base input)")
        check_pairing(task, base_ids, src_ids, raw_positions=True)
    return src_ids, ab_eff


def _source_cache(runner: ModelRunner, task: Task, ab_eff: Ablation, base_ids: Tensor, src_ids: Tensor | None,
                  reference: Sequence[str] | Tensor | None, hooks: list[str], n_keep: int,
                  dev: torch.device) -> dict[str, Tensor]:
    """The value each hook is patched to, [b, ...] per hook: the source run's activations (interchange), or the
    reference's mean / zeros broadcast over the b base inputs (mean / zero ablation)."""
    if ab_eff is Ablation.INTERCHANGE:
        _, src_cache = runner.run(src_ids[:, :n_keep].to(dev), cache=hooks, return_logits=False)
        return src_cache
    b = base_ids.shape[0]
    ref = base_ids if reference is None else as_ids(task, reference, "reference")
    _, ref_cache = runner.run(ref[:, :n_keep].to(dev), cache=hooks, return_logits=False)
    return {h: (a.mean(0, keepdim=True) if ab_eff is Ablation.MEAN else torch.zeros_like(a[:1]))
            .expand(b, *a.shape[1:]) for h, a in ref_cache.items()}


def _pending_cells(kind: str, hooks: list[str], base_cache: dict[str, Tensor], src_cache: dict[str, Tensor],
                   n_keep: int, t_pos: Tensor, causal: bool = True) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """Per layer L: (L, ex [m], cell [m, n_axes], src) for the (example, cell) pairs that can change the
    metric: the patch differs from the base value and, in a causal model, lies at or before the answer row
    (only at it for a row-local kind in the last block, in any model); src is the layer's truncated patch value
    [b, *cell axes, d]."""
    last = len(hooks) - 1
    work = []
    for L, h in enumerate(hooks):
        src, bas = _truncate(kind, src_cache[h], n_keep), _truncate(kind, base_cache[h], n_keep)
        differs = (src != bas).any(-1)  # [b, *cell axes (truncated)]
        cells = differs.nonzero()  # [m, 1 + n_axes]: (example, cell...)
        ex, cell = cells[:, 0], cells[:, 1:]
        cpos = _cell_pos(kind, cell)
        keep = cpos <= t_pos[ex] if causal else torch.ones_like(cpos, dtype=torch.bool)
        if L == last and kind in ROW_LOCAL:
            keep &= cpos == t_pos[ex]  # in the last block a row-local change never reaches another row
        work.append((L, ex[keep], cell[keep], src))
    return work


def _full_logits(plan: _SweepPlan, L: int, src: Tensor, resid_all: Tensor, ex: Tensor,
                 cell: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and the row to read them at after patching each pair's cell into a forward from block ``L``
    (the patched block(s) in full, then the last block for the answer row only): [m, 1, vocab] read at 0,
    or [m, pos, vocab] read at the answer rows when ``L`` is the last block.  resid_all: [b, pos, d_model]."""
    runner, hook = plan.runner, plan.hooks[L]
    last = runner.n_layers - 1
    patch = Blend(hook, _cell_mask(plan.kind, cell, src.shape, plan.device), src[ex])  # [m, *cell axes, 1], [m, ...]
    resid = {L: resid_all[ex]}
    if L < last:
        last_resid = f"blocks.{last - 1}.hook_resid_post"  # = the last block's resid_pre
        c: dict[str, Tensor] = {}
        engine.run(runner, plan.ids_cut[ex], [patch, Record([last_resid], c)], resid=resid, start_at_layer=L,
                   stop_at_layer=last)
        return _last_block_at(runner, c[last_resid], plan.t_pos[ex]), torch.zeros_like(ex)
    return engine.run(runner, plan.ids_cut[ex], [patch], resid=resid, start_at_layer=L), plan.t_pos[ex]


def _run_cells(plan: _SweepPlan, work: list[tuple[int, Tensor, Tensor, Tensor]], out: Tensor, ctx: MetricContext,
               ctx_dev: MetricContext, progress: bool) -> None:
    """Run the pending pairs ``plan.max_rows`` at a time, layer by layer, writing each metric into ``out``.
    Under torch.distributed each rank runs every world-size-th chunk (``circuitkit.shards``) and the ranks'
    values are merged, so every rank ends with the whole ``out``, equal to one process's."""
    chunks = [(j, i) for j, (_, ex_all, _, _) in enumerate(work) for i in range(0, ex_all.numel(), plan.max_rows)]
    mine = {k for k in range(len(chunks)) if shards.is_mine(k)}
    rows = [min(plan.max_rows, int(work[j][1].numel()) - i) for j, i in chunks]
    bar = tqdm(total=sum(rows[k] for k in mine), desc=f"sweep {plan.kind}", unit="patch", disable=not progress,
               leave=False)
    local, written = torch.zeros_like(out), torch.zeros(out.shape, dtype=torch.bool)
    for k, (j, i) in enumerate(chunks):
        L, ex_all, cell_all, src = work[j]
        ex, cell = ex_all[i:i + plan.max_rows], cell_all[i:i + plan.max_rows]
        at = (torch.full_like(ex, L).cpu(), *cell.cpu().unbind(1), ex.cpu())
        written[at] = True
        if k not in mine:
            continue
        if plan.direct:
            bas = _truncate(plan.kind, plan.base_cache[plan.hooks[L]], plan.n_keep)
            logits, read_at = _direct_logits(plan.runner, plan.kind, L, plan.base_cache, src, bas, ex, cell,
                                             plan.ids_cut, plan.t_pos, plan.n_keep, plan.answer_block, plan.suffix)
        else:
            resid_all = plan.base_cache[f"blocks.{L}.hook_resid_pre"][:, :plan.n_keep]  # [b, pos, d_model]
            logits, read_at = _full_logits(plan, L, src, resid_all, ex, cell)
        local[at] = _metric_values(plan.metric, logits, read_at, ex, ctx_dev, ctx.target)
        bar.update(int(ex.numel()))
    bar.close()
    out[written] = shards.sum_disjoint(local)[written]


@torch.no_grad()
def sweep(
    pm: ProbedModel,
    base: Sequence[str] | Tensor,
    kind: str,
    source: Sequence[str] | Tensor | None = None,
    ablation: str | Ablation = "interchange",
    reference: Sequence[str] | Tensor | None = None,
    metric: str = "logit_diff",
    target: str | None = None,
    max_rows: int = 4096,
    seed: int = 0,
    progress: bool = True,
    incremental: bool = True,
) -> SweepResult:
    """Patch each cell of ``kind`` (all layers x positions [x heads]) separately; see module doc.

    Exact shortcuts (no approximation): a cell whose source value equals the base value for an
    example, that lies after the example's answer position (causal masking), or that is a
    row-local change (see ``ROW_LOCAL``) in the last block at another row than the answer's,
    leaves that example's metric at its unpatched value and is not run; sequences are cut after
    the last answer position.  The remaining (cell, example) pairs run ``max_rows`` at a time,
    each forward starting at the patched layer from the cached base residual stream; when the
    patched layer is not the last, the last block runs for the answer row only.  ``incremental``
    (default): for a kind whose patch gives the patched row's residual directly (``ROW_DIRECT``), the
    patched block is computed for that one row (the others keep the base's values) instead of in full.
    """
    if kind not in SWEEP_KINDS:
        raise CircuitkitError(f"unknown sweep kind {kind!r}; valid: {choices_hint(SWEEP_KINDS)}")
    task, runner, dev = pm.task, pm.runner, pm.device
    ab = get_ablation(ablation)
    base_ids = as_ids(task, base, "base")
    src_ids, ab_eff = _resolve_sources(task, ab, base_ids, source, reference, seed)
    hook_fmt, axes = SWEEP_KINDS[kind]
    hooks = [hook_fmt.format(L=L) for L in range(pm.n_layers)]
    b, n_pos = base_ids.shape
    direct = incremental and kind in ROW_DIRECT
    extra = [f"blocks.{L}.hook_resid_{x}" for L in range(pm.n_layers) for x in ("mid", "post")] if direct else []
    ctx = metric_context(task, base_ids, src_ids, target)  # answer positions come from the tokens
    # positions after the last answer cannot matter with causal masking, so every run below stops there: the same
    # values, fewer rows (a bidirectional model reads every position)
    n_keep = int(ctx.positions.max()) + 1 if runner.arch.causal else n_pos
    ids_cut = base_ids[:, :n_keep].to(dev)
    base_logits, base_cache = runner.run(ids_cut, cache=list(dict.fromkeys(resid_names(pm.n_layers) + hooks + extra)))
    set_clean_logits(ctx, base_logits)
    base_vals = evaluate(metric, base_logits, ctx)[0].cpu()  # [b]
    src_cache = _source_cache(runner, task, ab_eff, base_ids, src_ids, reference, hooks, n_keep, dev)
    t_pos = ctx.positions.to(dev)  # [b]
    sizes = {"pos": n_pos, "dest_pos": n_pos, "head": pm.n_heads}
    shape = [pm.n_layers] + [sizes[a] for a in axes[1:]]
    out = base_vals.expand(*shape, b).clone()  # [layer, *cell axes, b]
    ctx_dev = ctx.to(dev)
    work = _pending_cells(kind, hooks, base_cache, src_cache, n_keep, t_pos, runner.arch.causal)
    last = pm.n_layers - 1
    answer_block = _AnswerRowBlock(runner, base_cache[f"blocks.{last}.hook_resid_pre"][:, :n_keep], t_pos) \
        if direct and last > 0 else None
    suffix = _SuffixBlocks(runner, base_cache, n_keep, t_pos) if direct and runner.arch.causal and last > 1 else None
    plan = _SweepPlan(runner, kind, metric, hooks, base_cache, ids_cut, t_pos, n_keep, dev, direct, answer_block,
                      suffix, max_rows)
    _run_cells(plan, work, out, ctx, ctx_dev, progress)
    return SweepResult(kind, axes, out, base_vals, metric, ab.value, ctx)


def _direct_logits(runner: ModelRunner, kind: str, L: int, base_cache: dict[str, Tensor], src: Tensor, bas: Tensor,
                   ex: Tensor, cell: Tensor, ids_cut: Tensor, t_pos: Tensor, n_keep: int,
                   answer_block: _AnswerRowBlock | None, suffix: _SuffixBlocks | None = None) -> tuple[Tensor, Tensor]:
    """Logits [m, 1, vocab] at each pair's answer row (and the row index into them, zeros) after a
    ``ROW_DIRECT`` patch: block ``L`` for the patched row only; the blocks between from the base's stream with
    that row replaced, for the rows from the patched one on in a causal model (``_SuffixBlocks``), else in full;
    the last block for the answer row only (from the base's keys, values and attention sums,
    ``_AnswerRowBlock``, when only the patched row differs there)."""
    row = _patched_row(runner, kind, L, base_cache, src, bas, ex, cell)  # [m, d_model]
    read_at = torch.zeros_like(ex)
    last = runner.n_layers - 1
    if L == last:  # only pairs patched at their answer row are here (row-local in the last block)
        return runner.unembed(row).unsqueeze(1), read_at
    if L + 1 == last and answer_block is not None:  # the last block's input differs in row p only
        return answer_block.logits(ex, cell[:, 0], row).unsqueeze(1), read_at
    if suffix is not None:
        return suffix.logits(L, ex, cell[:, 0], row).unsqueeze(1), read_at
    x = base_cache[f"blocks.{L}.hook_resid_post"][ex, :n_keep].clone()  # [m, pos, d_model]
    x[torch.arange(ex.numel(), device=x.device), cell[:, 0]] = row
    if L + 1 < last:
        hook = f"blocks.{last - 1}.hook_resid_post"
        c: dict[str, Tensor] = {}
        engine.run(runner, ids_cut[ex], [Record([hook], c)], resid={L + 1: x}, start_at_layer=L + 1, stop_at_layer=last)
        x = c[hook]
    return _last_block_at(runner, x, t_pos[ex]), read_at


def _metric_values(metric: str, logits: Tensor, read_at: Tensor, ex: Tensor, ctx: MetricContext,
                   target: str | None) -> Tensor:
    """The metric [m] (on the CPU) of patched ``logits`` read at ``read_at``, for base examples ``ex``."""
    rows_ctx = MetricContext(read_at, ctx.answer[ex], None if ctx.wrong is None else ctx.wrong[ex],
                             None if ctx.clean_logprobs is None else ctx.clean_logprobs[ex], target)
    return evaluate(metric, logits, rows_ctx)[0].cpu()
