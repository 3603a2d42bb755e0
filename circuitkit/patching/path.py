"""Path patching (Wang et al. 2022, IOI): a sender's effect on the output through one receiver only.

The sender (a site that writes into the residual stream: ``emb``, ``pos``, a head ``aL.H``,
``attnL``, ``mL``, at a position) takes its source value; every other component is frozen at its
base value, so the receiver's input changes by exactly the sender's change
``delta = sender(source) - sender(base)`` [b, pos, d_model] (added to the residual stream the
receiver reads).  Then the base run is repeated with only the receiver's input replaced and
everything downstream of it recomputed; the metric is read as usual.

Receivers: a head (``a1.0`` with input ``q``, ``k``, ``v`` or ``resid`` = all three; ``q1.0``
means ``a1.0`` via q), an MLP (``m1``, its input), or ``logits`` (the unembedding's input).  A
receiver position (``q1.0@:``) restricts the patched input to that row.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.runner import Hook, ModelRunner
from circuitkit.patching import engine
from circuitkit.patching.ablations import PositionSpec, as_ids, check_pairing, is_raw, resolve
from circuitkit.patching.engine import Blend, Patch, Record
from circuitkit.patching.metrics import evaluate, metric_context
from circuitkit.patching.node import NodePatchResult, resid_by_layer, resid_names
from circuitkit.sites import Site, check_site, parse_site
from circuitkit.tasks.base import Task

SENDER_KINDS = ("emb", "pos", "head", "z", "attn_out", "mlp_out")
_RESID = ("resid_pre", "resid_mid", "resid_post")
RECEIVER_INPUTS = ("q", "k", "v", "resid")

#: depth in the residual stream where a site's value is read (inputs) and written (outputs)
_READ = {"resid_pre": 0, "head": 0, "z": 0, "q": 0, "k": 0, "v": 0, "pattern": 0, "attn_out": 0,
         "resid_mid": 1, "mlp_post": 1, "mlp_out": 1, "resid_post": 2, "emb": 0, "pos": 0}
_WRITE = {"resid_pre": 0, "head": 1, "z": 1, "q": 1, "k": 1, "v": 1, "pattern": 1, "attn_out": 1,
          "resid_mid": 1, "mlp_post": 2, "mlp_out": 2, "resid_post": 2, "emb": 0, "pos": 0}


def read_depth(s: Site, parallel: bool = False) -> int:
    """Depth at which a site's value is read: 0 = embeddings; layer L's attention reads 2L, its MLP 2L+1
    (2L with a ``parallel`` residual, as in GPT-NeoX, where the MLP reads the block's input)."""
    if parallel and s.kind in ("mlp_post", "mlp_out"):
        return 2 * (s.layer or 0)
    return 2 * (s.layer or 0) + _READ[s.kind]


def write_depth(s: Site) -> int:
    """Depth at which a site's value is written: layer L's attention writes 2L+1, its MLP 2L+2."""
    return 2 * (s.layer or 0) + _WRITE[s.kind]


@dataclass(frozen=True)
class Receiver:
    """Where a path ends: ``kind`` in head / mlp / logits, its layer and head, which input, where."""

    kind: str
    layer: int | None = None
    head: int | None = None
    inputs: tuple[str, ...] = ()
    position: str | int | None = None

    def __str__(self) -> str:
        if self.kind == "logits":
            return "logits" if self.position is None else f"logits@{self.position}"
        name = f"a{self.layer}.{self.head}" if self.kind == "head" else f"m{self.layer}"
        ins = "+".join(self.inputs) if self.kind == "head" else "in"
        return f"{name}.{ins}" + ("" if self.position is None else f"@{self.position}")


def parse_receiver(text: str | Site, input: str = "resid") -> Receiver:
    """``logits``, ``a1.0`` (+ ``input``), ``q1.0`` / ``k1.0`` / ``v1.0``, ``m1``; ``@POS`` allowed."""
    if isinstance(text, str) and text.split("@")[0] == "logits":
        pos = text.partition("@")[2] or None
        return Receiver("logits", position=int(pos) if pos and pos.lstrip("-").isdigit() else pos)
    site = parse_site(text) if isinstance(text, str) else text
    if input not in RECEIVER_INPUTS:
        raise CircuitkitError(f"unknown receiver input {input!r}; valid: {', '.join(RECEIVER_INPUTS)}")
    if site.kind in ("q", "k", "v"):
        return Receiver("head", site.layer, site.head, (site.kind,), site.position)
    if site.kind == "head":
        ins = ("q", "k", "v") if input == "resid" else (input,)
        return Receiver("head", site.layer, site.head, ins, site.position)
    if site.kind == "mlp_out":
        return Receiver("mlp", site.layer, None, (), site.position)
    raise CircuitkitError(f"receiver {text} must be a head (aL.H, qL.H, kL.H, vL.H), an MLP (mL) or logits")


def feeds(sender: Site, receiver_kind: str, receiver_layer: int | None, parallel: bool = False) -> bool:
    """Whether a sender's output is in the residual stream that a receiver (``head``, ``mlp`` or ``logits``
    of ``receiver_layer``) reads: written at or before the depth it is read at (``read_depth``)."""
    if receiver_kind == "logits":
        return True
    read = read_depth(Site("mlp_out", receiver_layer) if receiver_kind == "mlp" else Site("resid_pre", receiver_layer),
                      parallel)
    return write_depth(sender) <= read


def _check_order(sender: Site, rec: Receiver, parallel: bool) -> None:
    if not feeds(sender, rec.kind, rec.layer, parallel):
        why = " (with a parallel residual a layer's MLP reads the block's input, not its attention's output)" \
            if parallel and rec.kind == "mlp" and sender.layer == rec.layer else ""
        raise CircuitkitError(f"sender {sender} does not feed receiver {rec}: it is not upstream of it{why}")


@torch.no_grad()
def sender_delta(pm: ProbedModel, base_ids: Tensor, source_ids: Tensor, sender: Site,
                 base_pos: Tensor | None, source_pos: Tensor | None) -> Tensor:
    """The sender's change to the residual stream, [b, pos, d_model] (zero off its positions)."""
    if sender.kind not in SENDER_KINDS:
        raise CircuitkitError(f"sender {sender} must write into the residual stream: one of {', '.join(SENDER_KINDS)}")
    s = Site("head", sender.layer, sender.head) if sender.kind == "z" else sender.at(None)
    stop = None if s.stop_layer >= pm.n_layers else s.stop_layer
    dev = pm.device
    _, cb = pm.runner.run(base_ids.to(dev), cache=[s.hook_name], stop_at_layer=stop, return_logits=False)
    _, cs = pm.runner.run(source_ids.to(dev), cache=[s.hook_name], stop_at_layer=stop, return_logits=False)
    vb, vs = s.select(cb[s.hook_name]), s.select(cs[s.hook_name])  # [b, pos, d_model]
    delta = torch.zeros_like(vb)
    if base_pos is None:
        return vs - vb
    rows = torch.arange(vb.shape[0], device=vb.device)
    delta[rows, base_pos.to(dev)] = vs[rows, source_pos.to(dev)] - vb[rows, base_pos.to(dev)]
    return delta


def _own_kv_hooks(r: ModelRunner, L: int, H: int, inputs: Sequence[str], delta: Tensor, seen: dict[str, Tensor],
                  hooks: dict) -> dict:
    """Hooks giving head H alone keys and/or values read from ``resid + delta`` when its key/value head is shared
    by a group (grouped-query attention): its attention scores (k) and its z (v) are recomputed from them,
    while the other heads of the group keep the shared, unpatched ones."""
    p = f"blocks.{L}.attn."
    q_hook = p + ("hook_rot_q" if r.arch.rotary_dim else "hook_q")
    out: dict = {}
    before = hooks.get(q_hook)  # the q receiver's own hook, when q is patched too

    def capture_q(act: Tensor) -> Tensor:
        act = before(act) if before is not None else act
        seen["q"] = act
        return act
    out[q_hook] = capture_q

    def own_kv() -> tuple[Tensor, Tensor]:  # head H's rotated keys and values from resid + delta, [b, pos, d_head]
        x = seen["x"]
        if seen.get("kv_of") is not x:  # once per run: the scores hook and the z hook share them
            k, v = r.keys_values(L, r.norm1(L, x + delta), torch.arange(x.shape[1], device=x.device))
            seen["kv_of"], seen["k"], seen["v"] = x, k[:, :, H], v[:, :, H]
        return seen["k"], seen["v"]
    if "k" in inputs:
        def scores_hook(act: Tensor) -> Tensor:
            k_h = own_kv()[0]
            s = r.scale(torch.einsum("bqe,bke->bqk", seen["q"][:, :, H], k_h))  # [b, q_pos, k_pos]
            act = act.clone()
            act[:, H] = r.causal_mask(s, torch.arange(s.shape[1], device=s.device)[:, None])
            return act
        out[p + "hook_attn_scores"] = scores_hook
    if "v" in inputs:
        out[p + "hook_pattern"] = lambda act: seen.__setitem__("pattern", act)

        def z_hook(act: Tensor) -> Tensor:
            act = act.clone()
            act[:, :, H] = torch.einsum("bqk,bke->bqe", seen["pattern"][:, H], own_kv()[1])
            return act
        out[p + "hook_z"] = z_hook
    return out


@dataclass
class ReceiverInput:
    """An engine intervention: the receiver's input (a head's q / k / v, an MLP's input) read from the residual
    stream plus ``delta`` [b, pos, d_model] (at ``rows`` [b] only, when given), everything else as it runs."""

    receiver: Receiver
    delta: Tensor
    rows: Tensor | None = None
    force_per_head_kv: bool = False

    @property
    def layer(self) -> int:
        return self.receiver.layer or 0

    def hooks(self, model: ModelRunner) -> dict[str, Hook]:
        return _receiver_hooks(model, self.receiver, self.delta, self.rows, self.force_per_head_kv)


def receiver_hooks(pm: ProbedModel, rec: Receiver, delta: Tensor, rec_pos: Tensor | None,
                   force_per_head_kv: bool = False) -> dict:
    """The runner hooks of ``ReceiverInput`` (kept for callers that differentiate through them)."""
    return ReceiverInput(rec, delta, rec_pos, force_per_head_kv).hooks(pm.runner)


def _receiver_hooks(r: ModelRunner, rec: Receiver, delta: Tensor, rec_pos: Tensor | None,
                    force_per_head_kv: bool) -> dict[str, Hook]:
    """Runner hooks that replace only the receiver's input by its value read from ``resid + delta``.  With
    grouped-query attention a head's keys and values are shared by its group, so head H gets its own copy
    (``_own_kv_hooks``); ``force_per_head_kv`` takes that route without a group too (the tests compare the two)."""
    row_mask = None
    if rec_pos is not None:
        row_mask = torch.zeros(delta.shape[:2], dtype=torch.bool, device=delta.device)
        row_mask[torch.arange(delta.shape[0]), rec_pos.to(delta.device)] = True
        delta = delta * row_mask.unsqueeze(-1)
    seen: dict[str, Tensor] = {}
    hooks = {}
    if rec.kind == "head":
        L, H = rec.layer, rec.head
        hooks[f"blocks.{L}.hook_resid_pre"] = lambda x: seen.__setitem__("x", x)
        shared = r.n_kv_heads != r.n_heads or force_per_head_kv
        for name in rec.inputs:
            if name != "q" and shared:
                continue  # a key/value head shared by a group: head H's own copy, below

            def hook(act: Tensor, name: str = name) -> Tensor:
                act = act.clone()
                act[:, :, H] = r.project(L, name, r.norm1(L, seen["x"] + delta), head=H)
                return act
            hooks[f"blocks.{L}.attn.hook_{name}"] = hook
        if shared and set(rec.inputs) & {"k", "v"}:
            hooks.update(_own_kv_hooks(r, L, H, rec.inputs, delta, seen, hooks))
    elif rec.kind == "mlp":
        L = rec.layer
        hooks[r.mlp_input_hook(L)] = lambda x: seen.__setitem__("x", x)
        hooks[f"blocks.{L}.mlp.hook_pre"] = lambda act: r.mlp_pre(L, r.norm2(L, seen["x"] + delta))
        if r.layers[L].W_gate is not None:  # the gated MLP's linear half reads the same input
            hooks[f"blocks.{L}.mlp.hook_pre_linear"] = lambda act: r.mlp_pre_linear(L, r.norm2(L, seen["x"] + delta))
    return hooks


@torch.no_grad()
def path_patch(
    pm: ProbedModel,
    base: Sequence[str] | Tensor,
    source: Sequence[str] | Tensor,
    sender: Site | str,
    receiver: Receiver | str,
    receiver_input: str = "resid",
    metric: str = "logit_diff",
    target: str | None = None,
    sender_base_pos: PositionSpec = None,
    sender_source_pos: PositionSpec = None,
) -> NodePatchResult:
    """Per-example metric with the sender -> receiver path patched (see module doc).

    Sender positions default to the sender site's position, resolved per input (base and source
    separately); override with ``sender_base_pos`` / ``sender_source_pos`` ([b] tensors allowed).
    """
    task, dev = pm.task, pm.device
    snd = parse_site(sender) if isinstance(sender, str) else sender
    rec = parse_receiver(receiver, receiver_input) if isinstance(receiver, (str, Site)) else receiver
    check_site(snd, pm.n_layers, pm.n_heads)
    if rec.layer is not None:
        check_site(Site("resid_pre", rec.layer), pm.n_layers, pm.n_heads)
        if rec.head is not None:
            check_site(Site("head", rec.layer, rec.head), pm.n_layers, pm.n_heads)
    _check_order(snd, rec, pm.runner.arch.parallel)
    base_ids, src_ids = as_ids(task, base, "base"), as_ids(task, source, "source")
    bspec = snd.position if sender_base_pos is None else sender_base_pos
    sspec = bspec if sender_source_pos is None else sender_source_pos
    check_pairing(task, base_ids, src_ids, is_raw(sspec))
    bpos, spos = resolve(task, base_ids, bspec, "base"), resolve(task, src_ids, sspec, "source")
    delta = sender_delta(pm, base_ids, src_ids, snd, bpos, spos)
    rec_pos = resolve(task, base_ids, rec.position, "receiver")
    clean_logits, cache = pm.runner.run(base_ids.to(dev), cache=resid_names(pm.n_layers)
                                        + [f"blocks.{pm.n_layers - 1}.hook_resid_post"])
    ctx = metric_context(task, base_ids, src_ids, target, clean_logits)
    if rec.kind == "logits":
        if rec_pos is not None:
            m = torch.zeros(delta.shape[:2], dtype=torch.bool, device=delta.device)
            m[torch.arange(delta.shape[0]), rec_pos.to(dev)] = True
            delta = delta * m.unsqueeze(-1)
        final = cache[f"blocks.{pm.n_layers - 1}.hook_resid_post"] + delta
        logits = engine.run(pm.runner, base_ids.to(dev), resid={pm.n_layers: final}, start_at_layer=pm.n_layers)
    else:
        logits = engine.run(pm.runner, base_ids.to(dev), [ReceiverInput(rec, delta, rec_pos)],
                            resid=resid_by_layer(cache))
    return NodePatchResult(metric, [f"{snd} -> {rec}"], "path", evaluate(metric, clean_logits, ctx)[0].cpu(),
                           evaluate(metric, logits, ctx)[0].cpu(), ctx)


def _frozen_hooks(sender: Site, receiver: Site, n_layers: int) -> list[str]:
    """Sorted hook names of every head result and MLP output written after ``sender`` and before ``receiver``
    reads: the components a path patch freezes at their base values."""
    freeze = []
    for L in range(n_layers):
        for kind, hook in (("head", f"blocks.{L}.attn.hook_result"), ("mlp_out", f"blocks.{L}.hook_mlp_out")):
            probe = Site(kind, L, 0 if kind == "head" else None)
            if write_depth(sender) < write_depth(probe) <= read_depth(receiver):
                freeze.append(hook)  # written after the sender and before the receiver reads
    return sorted(set(freeze))


def _site_rows(task: Task, ids: Tensor, site: Site, dev: torch.device) -> Tensor | None:
    """[b] indices of the site's position per input; None = every position."""
    return None if site.position is None else task.position_indices(ids.cpu(), site.position).to(dev)


def _live_rows(receiver: Site, rpos: Tensor | None, through_bundle: bool, shape: torch.Size,
               dev: torch.device) -> Tensor | None:
    """Bool [b, pos] marking where the frozen components run live: a residual-stream receiver reads the sender
    through whatever writes into it at its own position (its "bundle"); None = everything frozen."""
    if not (through_bundle and receiver.kind in _RESID and rpos is not None):
        return None
    live_rows = torch.zeros(shape, dtype=torch.bool, device=dev)
    live_rows[torch.arange(shape[0], device=dev), rpos] = True
    return live_rows


def _frozen_rows(live_rows: Tensor | None) -> Callable[[str], Tensor]:
    """hook name -> where its frozen base value is taken: every row but ``live_rows`` [b, pos] (None: all),
    shaped to broadcast over the hook's activation (a head result [b, pos, head, d], else [b, pos, d])."""
    def take(hook: str) -> Tensor:
        if live_rows is None:
            return torch.ones((), dtype=torch.bool)
        extra = 2 if hook.endswith("attn.hook_result") else 1
        return (~live_rows).reshape(*live_rows.shape, *([1] * extra))
    return take


@torch.no_grad()
def path_patch_to_site(pm: ProbedModel, base_ids: Tensor, source_ids: Tensor | None, sender: Site, receiver: Site,
                       through_bundle: bool = True, incremental: bool = True,
                       receiver_inputs: Sequence[str] | None = None) -> Tensor:
    """Logits [b, pos, vocab]: ``sender`` patched from the source along the path into the *site*
    ``receiver`` only (any site, e.g. ``a1.0@:`` or ``resid_mid1@:``, not just a head's input).
    ``source_ids`` None: zero ablation, the sender's value along the path is 0 (what a path that no source
    changes is tested with; ``circuit/structural.py``).  ``receiver_inputs`` (a head receiver): only these of
    its query, key and value read the patched stream, the others keep the base's (which input carries the edge).

    Wang et al.'s two steps: (1) rerun the base with the sender from the source and every head and
    MLP written between sender and receiver frozen at its base value, recording the receiver;
    (2) patch that receiver value into a clean base run and read the logits.  For a head receiver
    at every position this equals ``path_patch(..., receiver_input="resid")`` (tested); the
    circuit graph uses this form because its nodes are sites at positions.  A residual-stream receiver
    at a position (``x1.mid@:``) is read through the components that write into it there: those run
    live, so the path is sender -> (anything at the receiver's position up to its depth) -> receiver;
    ``through_bundle=False`` freezes those too (the direct path only, e.g. into the unembedding's input).

    Only what the path can change is recomputed: nothing above the receiver's block runs for the base's frozen
    values or the source's sender value, step (1) starts at the sender's block and step (2) at the receiver's,
    each from the base's own residual stream there (the blocks below are unchanged).  ``incremental=False`` runs
    every pass from the embeddings (the reference the tests and the benchmark compare with).
    """
    task, dev, n_layers = pm.task, pm.device, pm.n_layers
    base_ids = base_ids.to(dev)
    freeze = _frozen_hooks(sender, receiver, n_layers)
    # the blocks the two steps start at (an embedding site: the embeddings)
    s_start, r_start = ((sender.layer or 0), (receiver.layer or 0)) if incremental else (0, 0)
    starts = sorted({f"blocks.{L}.hook_resid_pre" for L in (s_start, r_start) if L > 0})
    stop = receiver.layer + 1 if receiver.layer is not None and receiver.layer + 1 < n_layers else None
    own = [sender.hook_name] if source_ids is None else []
    held = []  # the receiver head's inputs that keep their base values
    if receiver_inputs is not None:
        if receiver.kind != "head" or not set(receiver_inputs) <= {"q", "k", "v"} or not receiver_inputs:
            raise CircuitkitError(f"receiver_inputs {list(receiver_inputs)!r} need a head receiver and a non-empty "
                                  f"subset of q, k, v; got receiver {receiver}")
        held = [f"blocks.{receiver.layer}.attn.hook_{x}" for x in "qkv" if x not in receiver_inputs]
    _, bcache = pm.runner.run(base_ids, cache=sorted(set(freeze + starts + own + held)),
                              stop_at_layer=stop if incremental else None, return_logits=False)
    bpos, rpos = _site_rows(task, base_ids, sender, dev), _site_rows(task, base_ids, receiver, dev)
    if source_ids is None:
        value = torch.zeros_like(sender.select(bcache[sender.hook_name], bpos))
    else:
        source_ids = source_ids.to(dev)
        s_stop = sender.stop_layer if incremental and sender.stop_layer < n_layers else None
        _, scache = pm.runner.run(source_ids, cache=[sender.hook_name], stop_at_layer=s_stop, return_logits=False)
        value = sender.select(scache[sender.hook_name], _site_rows(task, source_ids, sender, dev))
    take = _frozen_rows(_live_rows(receiver, rpos, through_bundle, base_ids.shape, dev))
    rcache: dict[str, Tensor] = {}
    step_one = [Blend(n, take(n), bcache[n]) for n in freeze]
    for hook in held:  # [b, pos, heads (or key/value heads), d_head]: head H's own (or its group's) slot only
        slot = torch.zeros(bcache[hook].shape[2], dtype=torch.bool, device=dev)
        slot[receiver.head * bcache[hook].shape[2] // pm.n_heads] = True
        step_one.append(Blend(hook, slot[None, None, :, None], bcache[hook]))
    step_one += [Patch(sender, bpos, value), Record([receiver.hook_name], rcache)]
    engine.run(pm.runner, base_ids, step_one, resid=resid_by_layer(bcache), start_at_layer=s_start, stop_at_layer=stop,
               need_logits=False)
    rval = receiver.select(rcache[receiver.hook_name], rpos)
    return engine.run(pm.runner, base_ids, [Patch(receiver, rpos, rval)], resid=resid_by_layer(bcache),
                      start_at_layer=r_start)  # type: ignore[return-value]

