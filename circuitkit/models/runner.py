"""The one forward pass every engine uses: a lean, exact re-implementation of GPT-2, GPT-NeoX/Pythia and
Llama-style blocks with TransformerLens hook names, plus the block pieces engines recompute for receivers.

Why not only the TransformerLens bridge: circuitkit runs the probed model millions of times (decoder
training pairs, re-running every decoder sample, patching sweeps).  The bridge wraps the HF modules and fires
~45 hook points per layer; this runner reads the same weights (``models/architectures.py``), computes only
what is asked for, can stop after the last layer needed and can *start* at any layer from a given residual
stream.  ``tests/test_runner.py`` and ``tests/test_architectures.py`` check it against the bridge
(|Δ| ≤ 1e-4), so the bridge stays the reference.

Hook names (TransformerLens canonical):
    hook_embed, hook_pos_embed (learned positions only)        [batch, pos, d_model]
    blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post [batch, pos, d_model]
    blocks.L.attn.hook_q                                       [batch, pos, head, d_head]
    blocks.L.attn.hook_k / hook_v                              [batch, pos, kv_head, d_head]
    blocks.L.attn.hook_rot_q / hook_rot_k (rotary only)        q and k after the rotation
    blocks.L.attn.hook_attn_scores / hook_pattern              [batch, head, query_pos, key_pos]
    blocks.L.attn.hook_z                                       [batch, pos, head, d_head]
    blocks.L.attn.hook_result                                  [batch, pos, head, d_model]
    blocks.L.hook_attn_out, blocks.L.hook_mlp_out              [batch, pos, d_model]
    blocks.L.mlp.hook_pre / hook_pre_linear (gated) / hook_post [batch, pos, d_mlp]
    ln_final.hook_normalized                                   [batch, pos, d_model]
With a parallel residual (NeoX), the MLP reads the block's input and ``hook_resid_mid`` is resid_pre +
attn_out.  A hook is ``fn(tensor) -> tensor | None``; returning a tensor replaces the activation.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitkit.models.architectures import ACTIVATIONS, LayerWeights, architecture, read_weights

Hook = Callable[[Tensor], "Tensor | None"]
_Fire = Callable[[str, Tensor], Tensor]


def _make_fire(hooks: Mapping[str, Hook], want: set[str], out: dict[str, Tensor]) -> _Fire:
    """The per-run ``fire(name, x)``: applies the hook at ``name`` (a returned tensor replaces x) and records
    x in ``out`` when ``name`` is cached; one closure so each hook point costs a dict lookup and a set test."""

    def fire(name: str, x: Tensor) -> Tensor:
        fn = hooks.get(name)
        if fn is not None:
            y = fn(x)
            if y is not None:
                x = y
        if name in want:
            out[name] = x
        return x

    return fire


class ModelRunner:
    """Runs a supported HF causal LM's weights with hooks; differentiable, any device."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf_model = hf_model
        self.arch = a = architecture(hf_model)
        self.n_layers, self.n_heads, self.n_kv_heads = a.n_layers, a.n_heads, a.n_kv_heads
        self.d_model, self.d_head, self.n_ctx, self.d_vocab, self.eps = a.d_model, a.d_head, a.n_ctx, a.d_vocab, a.eps
        self.act_fn = ACTIVATIONS[a.act]
        self.refresh()

    def refresh(self) -> None:
        """Re-read the weights from the HF model (views: gradients flow to it, never stale after a step)."""
        w = read_weights(self.hf_model, self.arch)
        self.W_E, self.W_pos, self.lnf_w, self.lnf_b, self.W_U, self.b_U = w.W_E, w.W_pos, w.lnf_w, w.lnf_b, w.W_U, w.b_U
        self.layers: list[LayerWeights] = w.layers

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    # ---- block pieces (the only copy of the block maths) -------------------------------------
    def norm(self, x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        """LayerNorm (with its affine map) or RMSNorm, over the last dimension; the identity without a norm."""
        if self.arch.norm == "none":
            return x
        if self.arch.norm == "rms":
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return F.layer_norm(x, (self.d_model,), w, b, self.eps)

    def project(self, L: int, which: str, h: Tensor, head: int | None = None) -> Tensor:
        """q / k / v of block ``L`` from its normalised input h [..., d_model] -> [..., head, d_head], or
        [..., d_head] for one ``head`` (before any rotation; k and v are indexed by key/value head)."""
        w = self.layers[L]
        W, b = {"q": (w.W_Q, w.b_Q), "k": (w.W_K, w.b_K), "v": (w.W_V, w.b_V)}[which]
        if head is not None:
            return h @ W[head] + b[head]
        return torch.einsum("...d,hde->...he", h, W) + b

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotary embedding of q or k x [batch, pos, head, d_head] at ``positions`` [pos] or [batch, pos]
        (the first ``rotary_dim`` dims, halves rotated as in GPT-NeoX and Llama); identity without rotary."""
        r = self.arch.rotary_dim
        if not r:
            return x
        inv = 1.0 / (self.arch.rotary_base ** (torch.arange(0, r, 2, device=x.device, dtype=torch.float) / r))
        ang = positions.to(x.device).float()[..., None] * inv  # [(batch,) pos, r/2]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(x.dtype).unsqueeze(-2), ang.sin().to(x.dtype).unsqueeze(-2)  # [.., pos, 1, r]
        xr, xp = x[..., :r], x[..., r:]
        half = torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], dim=-1)
        return torch.cat([xr * cos + half * sin, xp], dim=-1)

    def expand_kv(self, x: Tensor) -> Tensor:
        """Key/value heads repeated to the query heads (grouped-query attention): [..., kv, e] -> [..., head, e]."""
        rep = self.n_heads // self.n_kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=-2)

    def scale(self, scores: Tensor) -> Tensor:
        return scores / math.sqrt(self.d_head) if self.arch.scale_attn else scores

    def head_out(self, L: int, z: Tensor, heads: Tensor | list[int] | None = None) -> Tensor:
        """Summed output of ``heads`` (default all) of block ``L``: z [..., head, d_head] -> [..., d_model] (no bias)."""
        W_O = self.layers[L].W_O if heads is None else self.layers[L].W_O[heads]
        return torch.einsum("...he,hed->...d", z, W_O)

    def mlp_pre(self, L: int, h: Tensor) -> Tensor:
        """``mlp.hook_pre`` from the MLP's normalised input (the gate's pre-activation when gated)."""
        w = self.layers[L]
        return h @ w.W_gate if w.W_gate is not None else h @ w.W_in + w.b_in

    def mlp_pre_linear(self, L: int, h: Tensor) -> Tensor:
        """``mlp.hook_pre_linear`` of a gated MLP: the linear half, from the MLP's normalised input."""
        w = self.layers[L]
        return h @ w.W_in + w.b_in

    def mlp_from_pre(self, L: int, pre: Tensor, h: Tensor) -> Tensor:
        """The MLP's output [..., d_model] from its pre-activation (and its normalised input, for the gate)."""
        w = self.layers[L]
        post = self.act_fn(pre) * self.mlp_pre_linear(L, h) if w.W_gate is not None else self.act_fn(pre)
        return post @ w.W_out + w.b_out

    def mlp(self, L: int, h: Tensor) -> Tensor:
        """Block ``L``'s MLP output from its normalised input h [..., d_model]."""
        return self.mlp_from_pre(L, self.mlp_pre(L, h), h)

    def mlp_input(self, L: int, resid_pre: Tensor, resid_mid: Tensor) -> Tensor:
        """What block ``L``'s MLP normalises: resid_mid, or the block's input with a parallel residual."""
        return resid_pre if self.arch.parallel else resid_mid

    def mlp_input_hook(self, L: int) -> str:
        """The hook holding what block ``L``'s MLP normalises (see ``mlp_input``)."""
        return f"blocks.{L}.hook_resid_pre" if self.arch.parallel else f"blocks.{L}.hook_resid_mid"

    def norm2(self, L: int, x: Tensor) -> Tensor:
        """Block ``L``'s MLP norm of x (its ``mlp_input``)."""
        return self.norm(x, self.layers[L].ln2_w, self.layers[L].ln2_b)

    def norm1(self, L: int, x: Tensor) -> Tensor:
        """Block ``L``'s attention norm of its resid_pre x."""
        return self.norm(x, self.layers[L].ln1_w, self.layers[L].ln1_b)

    def final_normalized(self, x: Tensor) -> Tensor:
        """``ln_final.hook_normalized``: the final norm before its affine map (as in TransformerLens)."""
        if self.arch.norm == "none":
            return x
        if self.arch.norm == "rms":
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return F.layer_norm(x, (self.d_model,), eps=self.eps)

    def unembed_normalized(self, xn: Tensor) -> Tensor:
        """Logits [..., vocab] from ``final_normalized`` output: the norm's affine map, then W_U (and b_U)."""
        y = xn if self.lnf_w is None else xn * self.lnf_w if self.lnf_b is None else xn * self.lnf_w + self.lnf_b
        logits = y @ self.W_U.T
        return logits if self.b_U is None else logits + self.b_U

    def unembed(self, x: Tensor) -> Tensor:
        """Final norm and unembedding: x [..., d_model] -> logits [..., vocab]."""
        return self.unembed_normalized(self.final_normalized(x))

    def embed(self, tokens: Tensor) -> Tensor:
        """Token (and learned position) embeddings, the first block's input: [batch, pos] -> [batch, pos, d_model]."""
        self.refresh()
        x = self.W_E[tokens]
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]].unsqueeze(0)
        return x

    # ---- attention (the only copy of scale -> causal mask -> softmax -> z) ------------------------
    def causal_mask(self, scores: Tensor, q_pos: Tensor) -> Tensor:
        """scores [..., key] with every key after its query's position ``q_pos`` (broadcastable to
        scores[..., :1], e.g. [q, 1] for a full pattern, [n, 1, 1] for one row per example) set to the dtype's
        minimum, so that the softmax gives it no weight.  A bidirectional model (``arch.causal`` False) masks nothing."""
        if not self.arch.causal:
            return scores
        k_pos = torch.arange(scores.shape[-1], device=scores.device)
        return scores.masked_fill(k_pos > q_pos, torch.finfo(scores.dtype).min)

    def row_scores(self, q: Tensor, k: Tensor, t: Tensor) -> Tensor:
        """Scaled, causally masked scores of one query row per example: q [n, head, d_head] at positions
        t [n], keys k [n, key, head, d_head] -> [n, head, key]."""
        return self.causal_mask(self.scale(torch.einsum("nhe,nkhe->nhk", q, k)), t[:, None, None])

    def attend_row(self, q: Tensor, k: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """z [n, head, d_head] of one query row per example (q [n, head, d_head] at positions t [n]) over keys
        and values k, v [n, key, head, d_head]."""
        return torch.einsum("nhk,nkhe->nhe", self.row_scores(q, k, t).softmax(-1), v)

    def block_at_rows(self, L: int, x: Tensor, t: Tensor, k_prefix: Tensor | None = None,
                      v_prefix: Tensor | None = None) -> Tensor:
        """Block ``L`` for one row per example: x [n, pos, d_model] (its resid_pre), t [n] -> resid_post [n, d_model].
        Keys and values come from every position up to t; the query, the MLP and the output only from row t.
        With ``k_prefix`` / ``v_prefix`` [n, s, head, d_head] (the keys and values of rows 0 .. s-1, a KV cache), x
        holds rows s .. only and t stays an absolute position (t >= s)."""
        s = 0 if k_prefix is None else k_prefix.shape[1]
        rows = torch.arange(x.shape[0], device=x.device)
        h1 = self.norm1(L, x)
        k, v = self.keys_values(L, h1, torch.arange(s, s + x.shape[1], device=x.device))  # [n, rows, head, d_head]
        if k_prefix is not None and v_prefix is not None:
            k, v = torch.cat([k_prefix, k], 1), torch.cat([v_prefix, v], 1)
        z = self.attend_row(self.query_at(L, h1[rows, t - s], t), k, v, t)  # [n, head, d_head]
        return self.row_from_z(L, x[rows, t - s], z)

    def block_suffix(self, L: int, x: Tensor, k_prefix: Tensor, v_prefix: Tensor) -> Tensor:
        """Block ``L`` for the rows from ``s = k_prefix.shape[1]`` on, in a causal model whose rows before s are
        known (a KV cache): x [n, r, d_model] is resid_pre of rows s .. s+r-1, k_prefix / v_prefix
        [n, s, head, d_head] the keys (rotated) and values of rows 0 .. s-1 -> resid_post [n, r, d_model]."""
        if not self.arch.causal:
            raise ValueError("block_suffix needs a causal model: in a bidirectional one every row reads the later ones")
        s, r = k_prefix.shape[1], x.shape[1]
        q_pos = torch.arange(s, s + r, device=x.device)
        h1 = self.norm1(L, x)
        k, v = self.keys_values(L, h1, q_pos)  # [n, r, head, d_head]
        k, v = torch.cat([k_prefix, k], 1), torch.cat([v_prefix, v], 1)  # [n, s + r, head, d_head]
        q = self.rotate(self.project(L, "q", h1), q_pos)  # [n, r, head, d_head]
        scores = self.causal_mask(self.scale(torch.einsum("nqhe,nkhe->nhqk", q, k)), q_pos[:, None])
        z = torch.einsum("nhqk,nkhe->nqhe", scores.softmax(-1), v)  # [n, r, head, d_head]
        return self.row_from_z(L, x, z)

    def keys_values(self, L: int, h1: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Block ``L``'s keys (rotated) and values, repeated to the query heads, from its normalised input
        h1 [..., pos, d_model] at positions ``pos`` ([pos] or [..., pos]): two [..., pos, head, d_head]."""
        return self.expand_kv(self.rotate(self.project(L, "k", h1), pos)), self.expand_kv(self.project(L, "v", h1))

    def query_at(self, L: int, h1: Tensor, t: Tensor) -> Tensor:
        """Block ``L``'s (rotated) query of one row per example: h1 [n, d_model] at positions t [n] -> [n, head, d_head]."""
        return self.rotate(self.project(L, "q", h1).unsqueeze(1), t[:, None]).squeeze(1)

    def row_from_z(self, L: int, x: Tensor, z: Tensor) -> Tensor:
        """Block ``L``'s resid_post for rows whose resid_pre is x [..., d_model] and whose heads' z is
        [..., head, d_head]: the attention output, then the MLP."""
        mid = x + self.head_out(L, z) + self.layers[L].b_O
        return mid + self.mlp(L, self.norm2(L, self.mlp_input(L, x, mid)))

    # ---- the forward pass --------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        """All hook points this runner fires, in execution order."""
        rotary = bool(self.arch.rotary_dim)
        gated = self.layers[0].W_gate is not None if self.layers else False
        names = ["hook_embed"] + ([] if rotary else ["hook_pos_embed"])
        for L in range(self.n_layers):
            p = f"blocks.{L}."
            names += [p + "hook_resid_pre"] + [p + f"attn.hook_{x}" for x in ("q", "k", "v")]
            names += [p + "attn.hook_rot_q", p + "attn.hook_rot_k"] if rotary else []
            names += [p + f"attn.hook_{x}" for x in ("attn_scores", "pattern", "z", "result")]
            names += [p + "hook_attn_out", p + "hook_resid_mid", p + "mlp.hook_pre"]
            names += [p + "mlp.hook_pre_linear"] if gated else []
            names += [p + "mlp.hook_post", p + "hook_mlp_out", p + "hook_resid_post"]
        return names + ["ln_final.hook_normalized"]

    def run(
        self,
        tokens: Tensor,
        hooks: Mapping[str, Hook] | None = None,
        cache: Iterable[str] | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int = 0,
        resid: Tensor | None = None,
        return_logits: bool = True,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Forward pass.

        Args:
            tokens: [batch, pos] token ids (also used for shape when starting mid-way).
            hooks: hook name -> fn(activation) returning a replacement or None.
            cache: hook names whose activations to return.
            stop_at_layer: run blocks ``start_at_layer .. stop_at_layer-1`` only, return no logits.
            start_at_layer / resid: begin at block ``start_at_layer`` with the given
                ``blocks.{start}.hook_resid_pre`` [batch, pos, d_model] (embeddings skipped).
        Returns:
            (logits [batch, pos, vocab] or None, {hook name: activation}).
        """
        self.refresh()
        hooks = dict(hooks or {})
        want = set(cache or ())
        unknown = (set(hooks) | want) - set(self.hook_names())
        if unknown:
            raise KeyError(f"unknown hook names {sorted(unknown)}; see ModelRunner.hook_names()")
        out: dict[str, Tensor] = {}
        fire = _make_fire(hooks, want, out)
        need_result = any(n.endswith("attn.hook_result") for n in set(hooks) | want)
        end = self.n_layers if stop_at_layer is None else stop_at_layer
        n_pos = tokens.shape[1]
        positions = torch.arange(n_pos, device=self.device)
        x = self._input_stream(tokens, start_at_layer, resid, fire)  # [batch, pos, d_model]
        rotary = bool(self.arch.rotary_dim)
        for L in range(start_at_layer, end):
            x = self._run_block(L, x, fire, positions, rotary, need_result)
        if stop_at_layer is not None or not return_logits:
            return None, out
        return self.unembed_normalized(fire("ln_final.hook_normalized", self.final_normalized(x))), out

    def _input_stream(self, tokens: Tensor, start_at_layer: int, resid: Tensor | None, fire: _Fire) -> Tensor:
        """The residual stream entering block ``start_at_layer`` [batch, pos, d_model]: the (hooked) embeddings
        from the tokens, or the given ``resid`` when the run starts mid-way."""
        if start_at_layer == 0 and resid is None:
            n_pos = tokens.shape[1]
            x = fire("hook_embed", self.W_E[tokens])
            if self.W_pos is not None:
                x = x + fire("hook_pos_embed", self.W_pos[:n_pos].unsqueeze(0).expand(tokens.shape[0], -1, -1))
            return x
        if resid is None:
            raise ValueError("start_at_layer > 0 needs resid (the residual stream entering that block)")
        return resid

    def _run_block(self, L: int, x: Tensor, fire: _Fire, positions: Tensor, rotary: bool, need_result: bool) -> Tensor:
        """Block ``L`` with its hooks fired in TransformerLens order: resid_pre x [batch, pos, d_model] ->
        resid_post [batch, pos, d_model]."""
        p = f"blocks.{L}."
        x = fire(p + "hook_resid_pre", x)
        attn_out = fire(p + "hook_attn_out", self._run_attention(L, x, fire, positions, rotary, need_result))
        mid = fire(p + "hook_resid_mid", x + attn_out)
        mlp_out = fire(p + "hook_mlp_out", self._run_mlp(L, x, mid, fire))
        return fire(p + "hook_resid_post", mid + mlp_out)

    def _run_attention(self, L: int, x: Tensor, fire: _Fire, positions: Tensor, rotary: bool,
                       need_result: bool) -> Tensor:
        """Block ``L``'s attention output [batch, pos, d_model] (before ``hook_attn_out``) from its resid_pre x,
        firing the attention hooks; the per-head ``hook_result`` is only formed when ``need_result``."""
        w, p = self.layers[L], f"blocks.{L}."
        h1 = self.norm1(L, x)  # [batch, pos, d_model]
        q = fire(p + "attn.hook_q", self.project(L, "q", h1))  # [batch, pos, head, d_head]
        k = fire(p + "attn.hook_k", self.project(L, "k", h1))  # [batch, pos, kv_head, d_head]
        v = fire(p + "attn.hook_v", self.project(L, "v", h1))  # [batch, pos, kv_head, d_head]
        if rotary:
            q = fire(p + "attn.hook_rot_q", self.rotate(q, positions))
            k = fire(p + "attn.hook_rot_k", self.rotate(k, positions))
        scores = self.scale(torch.einsum("bqhe,bkhe->bhqk", q, self.expand_kv(k)))  # [batch, head, q_pos, k_pos]
        scores = fire(p + "attn.hook_attn_scores", self.causal_mask(scores, positions[:, None]))
        pattern = fire(p + "attn.hook_pattern", scores.softmax(dim=-1))  # [batch, head, q_pos, k_pos]
        z = fire(p + "attn.hook_z", torch.einsum("bhqk,bkhe->bqhe", pattern, self.expand_kv(v)))  # [b, pos, head, e]
        if need_result:
            result = fire(p + "attn.hook_result", torch.einsum("bqhe,hed->bqhd", z, w.W_O))  # [b, pos, head, d]
            return result.sum(dim=2) + w.b_O
        return self.head_out(L, z) + w.b_O

    def _run_mlp(self, L: int, x: Tensor, mid: Tensor, fire: _Fire) -> Tensor:
        """Block ``L``'s MLP output [batch, pos, d_model] (before ``hook_mlp_out``) from its resid_pre x and
        resid_mid ``mid`` (which one it reads: ``mlp_input``), firing the MLP hooks."""
        w, p = self.layers[L], f"blocks.{L}."
        h2 = self.norm2(L, self.mlp_input(L, x, mid))  # [batch, pos, d_model]
        pre = fire(p + "mlp.hook_pre", self.mlp_pre(L, h2))  # [batch, pos, d_mlp]
        if w.W_gate is not None:
            lin = fire(p + "mlp.hook_pre_linear", self.mlp_pre_linear(L, h2))
            post = fire(p + "mlp.hook_post", self.act_fn(pre) * lin)
        else:
            post = fire(p + "mlp.hook_post", self.act_fn(pre))
        return post @ w.W_out + w.b_out

    def logits(self, tokens: Tensor) -> Tensor:
        """Plain forward: logits [batch, pos, vocab]."""
        return self.run(tokens)[0]  # type: ignore[return-value]


__all__ = ["Hook", "ModelRunner"]
