"""A lean, exact re-implementation of the GPT-2 forward pass with TransformerLens hook names.

Why not only the TransformerLens bridge: circuitkit runs the probed model millions of times
(decoder training pairs, re-running every decoder sample, patching sweeps).  The bridge wraps
HuggingFace modules and fires ~45 hook points per layer; this runner reads the same weights,
computes only what is asked for, can stop after the last layer needed and can *start* at any
layer from a given residual stream.  ``tests/test_runner.py`` checks that every activation equals
the bridge's ``run_with_cache`` (|Δ| ≤ 1e-4), so the bridge stays the reference.

Hook names (TransformerLens canonical):
    hook_embed, hook_pos_embed                                 [batch, pos, d_model]
    blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post [batch, pos, d_model]
    blocks.L.attn.hook_q / hook_k / hook_v / hook_z            [batch, pos, head, d_head]
    blocks.L.attn.hook_attn_scores / hook_pattern              [batch, head, query_pos, key_pos]
    blocks.L.attn.hook_result                                  [batch, pos, head, d_model]
    blocks.L.hook_attn_out, blocks.L.hook_mlp_out              [batch, pos, d_model]
    blocks.L.mlp.hook_pre / hook_post                          [batch, pos, d_mlp]
    ln_final.hook_normalized                                   [batch, pos, d_model]
A hook is ``fn(tensor) -> tensor | None``; returning a tensor replaces the activation.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Hook = Callable[[Tensor], "Tensor | None"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class LayerWeights:
    """Weights of one GPT-2 block in TransformerLens layout."""

    ln1_w: Tensor  # [d_model]
    ln1_b: Tensor
    W_Q: Tensor  # [head, d_model, d_head]
    W_K: Tensor
    W_V: Tensor
    b_Q: Tensor  # [head, d_head]
    b_K: Tensor
    b_V: Tensor
    W_O: Tensor  # [head, d_head, d_model]
    b_O: Tensor  # [d_model]
    ln2_w: Tensor
    ln2_b: Tensor
    W_in: Tensor  # [d_model, d_mlp]
    b_in: Tensor
    W_out: Tensor  # [d_mlp, d_model]
    b_out: Tensor


class GPT2Runner:
    """Runs a HuggingFace ``GPT2LMHeadModel``'s weights with hooks; differentiable, any device."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        cfg = hf_model.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            raise NotImplementedError("GPT2Runner supports the standard GPT-2 attention scaling only")
        self.n_layers: int = cfg.n_layer
        self.n_heads: int = cfg.n_head
        self.d_model: int = cfg.n_embd
        self.d_head: int = cfg.n_embd // cfg.n_head
        self.n_ctx: int = cfg.n_positions
        self.d_vocab: int = cfg.vocab_size
        self.eps: float = cfg.layer_norm_epsilon
        self.scale_attn: bool = getattr(cfg, "scale_attn_weights", True)
        act = cfg.activation_function
        if act not in _ACTIVATIONS:
            raise NotImplementedError(f"activation {act!r} not supported; supported: {sorted(_ACTIVATIONS)}")
        self.act_fn = _ACTIVATIONS[act]
        self.hf_model = hf_model
        self.refresh()

    def refresh(self) -> None:
        """Re-read the weights from the HF model (views, no copies: gradients flow to it)."""
        tr = self.hf_model.transformer
        h, dh, d = self.n_heads, self.d_head, self.d_model
        self.W_E: Tensor = tr.wte.weight  # [vocab, d_model]
        self.W_pos: Tensor = tr.wpe.weight  # [n_ctx, d_model]
        self.lnf_w, self.lnf_b = tr.ln_f.weight, tr.ln_f.bias
        self.W_U: Tensor = self.hf_model.lm_head.weight  # [vocab, d_model]
        self.b_U: Tensor | None = getattr(self.hf_model.lm_head, "bias", None)
        self.layers: list[LayerWeights] = []
        for blk in tr.h:
            W = blk.attn.c_attn.weight  # [d_model, 3*d_model] (Conv1D: x @ W)
            b = blk.attn.c_attn.bias
            Wq, Wk, Wv = W.split(d, dim=1)
            bq, bk, bv = b.split(d, dim=0)
            per_head = lambda M: M.reshape(d, h, dh).permute(1, 0, 2)  # noqa: E731
            self.layers.append(
                LayerWeights(
                    ln1_w=blk.ln_1.weight, ln1_b=blk.ln_1.bias,
                    W_Q=per_head(Wq), W_K=per_head(Wk), W_V=per_head(Wv),
                    b_Q=bq.reshape(h, dh), b_K=bk.reshape(h, dh), b_V=bv.reshape(h, dh),
                    W_O=blk.attn.c_proj.weight.reshape(h, dh, d), b_O=blk.attn.c_proj.bias,
                    ln2_w=blk.ln_2.weight, ln2_b=blk.ln_2.bias,
                    W_in=blk.mlp.c_fc.weight, b_in=blk.mlp.c_fc.bias,
                    W_out=blk.mlp.c_proj.weight, b_out=blk.mlp.c_proj.bias,
                )
            )

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    # ------------------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        """All hook points this runner fires, in execution order."""
        names = ["hook_embed", "hook_pos_embed"]
        for L in range(self.n_layers):
            p = f"blocks.{L}."
            names += [p + "hook_resid_pre"]
            names += [p + f"attn.hook_{x}" for x in ("q", "k", "v", "attn_scores", "pattern", "z", "result")]
            names += [p + "hook_attn_out", p + "hook_resid_mid", p + "mlp.hook_pre", p + "mlp.hook_post",
                      p + "hook_mlp_out", p + "hook_resid_post"]
        return names + ["ln_final.hook_normalized"]

    def _ln(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.layer_norm(x, (self.d_model,), w, b, self.eps)

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
        self.refresh()  # views of the live parameters: cheap, and never stale after an optimizer step
        hooks = dict(hooks or {})
        want = set(cache or ())
        unknown = (set(hooks) | want) - set(self.hook_names())
        if unknown:
            raise KeyError(f"unknown hook names {sorted(unknown)}; see GPT2Runner.hook_names()")
        out: dict[str, Tensor] = {}

        def fire(name: str, x: Tensor) -> Tensor:
            fn = hooks.get(name)
            if fn is not None:
                y = fn(x)
                if y is not None:
                    x = y
            if name in want:
                out[name] = x
            return x

        need_result = any(n.endswith("attn.hook_result") for n in set(hooks) | want)
        end = self.n_layers if stop_at_layer is None else stop_at_layer
        n_pos = tokens.shape[1]
        if start_at_layer == 0 and resid is None:
            emb = fire("hook_embed", self.W_E[tokens])
            pos = fire("hook_pos_embed", self.W_pos[:n_pos].unsqueeze(0).expand(tokens.shape[0], -1, -1))
            x = emb + pos
        else:
            if resid is None:
                raise ValueError("start_at_layer > 0 needs resid (the residual stream entering that block)")
            x = resid
        mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).tril()
        for L in range(start_at_layer, end):
            w, p = self.layers[L], f"blocks.{L}."
            x = fire(p + "hook_resid_pre", x)
            h1 = self._ln(x, w.ln1_w, w.ln1_b)
            q = fire(p + "attn.hook_q", torch.einsum("bpd,hde->bphe", h1, w.W_Q) + w.b_Q)
            k = fire(p + "attn.hook_k", torch.einsum("bpd,hde->bphe", h1, w.W_K) + w.b_K)
            v = fire(p + "attn.hook_v", torch.einsum("bpd,hde->bphe", h1, w.W_V) + w.b_V)
            scores = torch.einsum("bqhe,bkhe->bhqk", q, k)
            if self.scale_attn:
                scores = scores / math.sqrt(self.d_head)
            scores = fire(p + "attn.hook_attn_scores", scores.masked_fill(~mask, torch.finfo(scores.dtype).min))
            pattern = fire(p + "attn.hook_pattern", scores.softmax(dim=-1))
            z = fire(p + "attn.hook_z", torch.einsum("bhqk,bkhe->bqhe", pattern, v))
            if need_result:
                result = fire(p + "attn.hook_result", torch.einsum("bqhe,hed->bqhd", z, w.W_O))
                attn_out = result.sum(dim=2) + w.b_O
            else:
                attn_out = torch.einsum("bqhe,hed->bqd", z, w.W_O) + w.b_O
            attn_out = fire(p + "hook_attn_out", attn_out)
            x = fire(p + "hook_resid_mid", x + attn_out)
            h2 = self._ln(x, w.ln2_w, w.ln2_b)
            pre = fire(p + "mlp.hook_pre", h2 @ w.W_in + w.b_in)
            post = fire(p + "mlp.hook_post", self.act_fn(pre))
            mlp_out = fire(p + "hook_mlp_out", post @ w.W_out + w.b_out)
            x = fire(p + "hook_resid_post", x + mlp_out)
        if stop_at_layer is not None or not return_logits:
            return None, out
        # as in TransformerLens, hook_normalized is the normalised stream before the affine map
        xn = fire("ln_final.hook_normalized", F.layer_norm(x, (self.d_model,), eps=self.eps))
        logits = (xn * self.lnf_w + self.lnf_b) @ self.W_U.T
        if self.b_U is not None:
            logits = logits + self.b_U
        return logits, out

    def logits(self, tokens: Tensor) -> Tensor:
        """Plain forward: logits [batch, pos, vocab]."""
        return self.run(tokens)[0]  # type: ignore[return-value]
