"""Reading a Hugging Face causal LM's weights into one layout (TransformerLens's), per architecture.

The runner (``models/runner.py``) owns the forward pass; this module only says, for each supported family,
where the weights live and how the block is wired:

=========  ==========  ==========  ==================  =========  =========  ==========
family     norm        positions   residual            MLP        K/V heads  biases
=========  ==========  ==========  ==================  =========  =========  ==========
gpt2       LayerNorm   learned     sequential          GELU       = heads    yes
gpt_neox   LayerNorm   rotary      parallel (usually)  GELU       = heads    yes
llama      RMSNorm     rotary      sequential          gated SiLU  grouped   no (default)
native     none        learned     sequential          ReLU/GELU  = heads    yes
=========  ==========  ==========  ==================  =========  =========  ==========

``native`` (``models/native.py``) is a TransformerLens-native directory (tracr-compiled programs, toy models):
no LayerNorm, d_head independent of d_model, an output vocabulary of its own, and causal or *bidirectional*
attention (``Architecture.causal``, honoured by the runner's one causal mask).

Weights are views of the module's parameters where the layout allows (GPT-2, Llama), so gradients reach
them; NeoX's fused QKV is split by reshaping a view as well.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitkit.errors import CircuitkitError

#: the Hugging Face ``model_type`` values the runner supports
SUPPORTED = ("gpt2", "gpt_neox", "llama", "circuitkit_native")

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class LayerWeights:
    """One block in TransformerLens layout.  ``ln*_b`` is None for RMSNorm, ``W_gate`` None without a gate."""

    ln1_w: Tensor | None  # [d_model]; None without normalisation
    ln1_b: Tensor | None
    W_Q: Tensor  # [head, d_model, d_head]
    W_K: Tensor  # [kv_head, d_model, d_head]
    W_V: Tensor  # [kv_head, d_model, d_head]
    b_Q: Tensor  # [head, d_head]
    b_K: Tensor  # [kv_head, d_head]
    b_V: Tensor
    W_O: Tensor  # [head, d_head, d_model]
    b_O: Tensor  # [d_model]
    ln2_w: Tensor | None
    ln2_b: Tensor | None
    W_in: Tensor  # [d_model, d_mlp]
    b_in: Tensor  # [d_mlp]
    W_gate: Tensor | None  # [d_model, d_mlp]
    W_out: Tensor  # [d_mlp, d_model]
    b_out: Tensor  # [d_model]


@dataclass
class Architecture:
    """How a block is wired (see the module table) and its sizes."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int
    eps: float
    norm: str  # "layer" | "rms" | "none"
    rotary_dim: int  # 0 = learned absolute positions
    rotary_base: float
    parallel: bool
    act: str
    scale_attn: bool = True
    causal: bool = True  # False: every position attends to every other (bidirectional)


@dataclass
class ModelWeights:
    """Every weight the runner reads."""

    W_E: Tensor  # [vocab, d_model]
    W_pos: Tensor | None  # [n_ctx, d_model]; None with rotary positions
    lnf_w: Tensor | None
    lnf_b: Tensor | None
    W_U: Tensor  # [vocab, d_model]
    b_U: Tensor | None
    layers: list[LayerWeights]


def _cfg(cfg: object, *names: str, default: object = None) -> object:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _rope(cfg: object) -> tuple[float, float]:
    """(rotary base, fraction of head dims rotated) across config spellings of transformers 4 and 5."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise CircuitkitError(f"rotary scaling {params.get('rope_type')!r} is not supported; only plain RoPE")
    base = params.get("rope_theta", _cfg(cfg, "rope_theta", "rotary_emb_base", default=10000.0))
    frac = params.get("partial_rotary_factor", _cfg(cfg, "partial_rotary_factor", "rotary_pct", default=1.0))
    return float(base), float(frac)


def architecture(hf_model: torch.nn.Module) -> Architecture:
    """The wiring and sizes of a supported HF model; a clear error names what is not supported."""
    cfg = hf_model.config
    family = cfg.model_type
    if family not in SUPPORTED:
        raise CircuitkitError(f"model type {family!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if family == "circuitkit_native":
        arch = Architecture("native", cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.n_ctx,
                            cfg.d_vocab, 0.0, "none", 0, 0.0, False, cfg.act_fn, True, cfg.causal)
    elif family == "gpt2":
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            raise CircuitkitError("GPT-2 with per-layer attention scaling is not supported")
        arch = Architecture("gpt2", cfg.n_layer, cfg.n_head, cfg.n_head, cfg.n_embd, cfg.n_embd // cfg.n_head,
                            cfg.n_positions, cfg.vocab_size, cfg.layer_norm_epsilon, "layer", 0, 0.0, False,
                            cfg.activation_function, getattr(cfg, "scale_attn_weights", True))
    elif family == "gpt_neox":
        base, frac = _rope(cfg)
        d_head = cfg.hidden_size // cfg.num_attention_heads
        arch = Architecture("gpt_neox", cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_attention_heads,
                            cfg.hidden_size, d_head, cfg.max_position_embeddings, cfg.vocab_size,
                            cfg.layer_norm_eps, "layer", int(d_head * frac), base, bool(cfg.use_parallel_residual),
                            cfg.hidden_act)
    else:
        base, frac = _rope(cfg)
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        arch = Architecture("llama", cfg.num_hidden_layers, cfg.num_attention_heads,
                            cfg.num_key_value_heads or cfg.num_attention_heads, cfg.hidden_size, d_head,
                            cfg.max_position_embeddings, cfg.vocab_size, cfg.rms_norm_eps, "rms",
                            int(d_head * frac), base, False, cfg.hidden_act)
    if arch.act not in ACTIVATIONS:
        raise CircuitkitError(f"activation {arch.act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if arch.n_heads % arch.n_kv_heads:
        raise CircuitkitError(f"{arch.n_heads} heads do not divide into {arch.n_kv_heads} key/value heads")
    return arch


def _zeros_like_bias(n: int, like: Tensor) -> Tensor:
    return torch.zeros(n, dtype=like.dtype, device=like.device)


def read_weights(hf_model: torch.nn.Module, arch: Architecture) -> ModelWeights:
    """The model's weights in TransformerLens layout (views of the live parameters where possible)."""
    return {"gpt2": _gpt2, "gpt_neox": _neox, "llama": _llama, "native": _native}[arch.family](hf_model, arch)


def _native(m: torch.nn.Module, a: Architecture) -> ModelWeights:
    d, h, dh = a.d_model, a.n_heads, a.d_head
    per_head = lambda lin: lin.weight.T.reshape(d, h, dh).permute(1, 0, 2)  # noqa: E731 - [h*dh, d] head-major
    layers = []
    for blk in m.blocks:
        at, mlp = blk.attn, blk.mlp
        layers.append(LayerWeights(
            None, None, per_head(at["q"]), per_head(at["k"]), per_head(at["v"]), at["q"].bias.reshape(h, dh),
            at["k"].bias.reshape(h, dh), at["v"].bias.reshape(h, dh), at["o"].weight.T.reshape(h, dh, d),
            at["o"].bias, None, None, mlp["in"].weight.T, mlp["in"].bias, None, mlp["out"].weight.T, mlp["out"].bias))
    return ModelWeights(m.embed.weight, m.pos_embed.weight, None, None, m.unembed.weight, m.unembed.bias, layers)


def _gpt2(m: torch.nn.Module, a: Architecture) -> ModelWeights:
    tr, d, h, dh = m.transformer, a.d_model, a.n_heads, a.d_head
    layers = []
    for blk in tr.h:
        W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # Conv1D [d_model, 3*d_model]: x @ W
        Wq, Wk, Wv = W.split(d, dim=1)
        bq, bk, bv = b.split(d, dim=0)
        per_head = lambda M: M.reshape(d, h, dh).permute(1, 0, 2)  # noqa: E731
        layers.append(LayerWeights(
            blk.ln_1.weight, blk.ln_1.bias, per_head(Wq), per_head(Wk), per_head(Wv), bq.reshape(h, dh),
            bk.reshape(h, dh), bv.reshape(h, dh), blk.attn.c_proj.weight.reshape(h, dh, d), blk.attn.c_proj.bias,
            blk.ln_2.weight, blk.ln_2.bias, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, None, blk.mlp.c_proj.weight,
            blk.mlp.c_proj.bias))
    return ModelWeights(tr.wte.weight, tr.wpe.weight, tr.ln_f.weight, tr.ln_f.bias, m.lm_head.weight,
                        getattr(m.lm_head, "bias", None), layers)


def _neox(m: torch.nn.Module, a: Architecture) -> ModelWeights:
    core, d, h, dh = m.gpt_neox, a.d_model, a.n_heads, a.d_head
    layers = []
    for blk in core.layers:
        att = blk.attention
        W = att.query_key_value.weight.reshape(h, 3, dh, d)  # Linear [3*d, d]: per head [q | k | v]
        b = (att.query_key_value.bias.reshape(h, 3, dh) if att.query_key_value.bias is not None
             else torch.zeros(h, 3, dh, dtype=W.dtype, device=W.device))
        dense_b = att.dense.bias if att.dense.bias is not None else _zeros_like_bias(d, W)
        layers.append(LayerWeights(
            blk.input_layernorm.weight, blk.input_layernorm.bias, W[:, 0].transpose(1, 2), W[:, 1].transpose(1, 2),
            W[:, 2].transpose(1, 2), b[:, 0], b[:, 1], b[:, 2], att.dense.weight.T.reshape(h, dh, d), dense_b,
            blk.post_attention_layernorm.weight, blk.post_attention_layernorm.bias, blk.mlp.dense_h_to_4h.weight.T,
            blk.mlp.dense_h_to_4h.bias, None, blk.mlp.dense_4h_to_h.weight.T, blk.mlp.dense_4h_to_h.bias))
    head = m.lm_head if hasattr(m, "lm_head") else m.embed_out  # transformers 5 / 4 attribute names
    return ModelWeights(core.embed_in.weight, None, core.final_layer_norm.weight, core.final_layer_norm.bias,
                        head.weight, getattr(head, "bias", None), layers)


def _llama(m: torch.nn.Module, a: Architecture) -> ModelWeights:
    core, d, h, kv, dh = m.model, a.d_model, a.n_heads, a.n_kv_heads, a.d_head
    layers = []
    for blk in core.layers:
        att, mlp = blk.self_attn, blk.mlp
        def bias(lin: torch.nn.Linear, n: int, ref: Tensor = att.q_proj.weight) -> Tensor:
            return lin.bias if lin.bias is not None else _zeros_like_bias(n, ref)

        layers.append(LayerWeights(
            blk.input_layernorm.weight, None, att.q_proj.weight.T.reshape(d, h, dh).permute(1, 0, 2),
            att.k_proj.weight.T.reshape(d, kv, dh).permute(1, 0, 2),
            att.v_proj.weight.T.reshape(d, kv, dh).permute(1, 0, 2), bias(att.q_proj, h * dh).reshape(h, dh),
            bias(att.k_proj, kv * dh).reshape(kv, dh), bias(att.v_proj, kv * dh).reshape(kv, dh),
            att.o_proj.weight.T.reshape(h, dh, d), bias(att.o_proj, d), blk.post_attention_layernorm.weight, None,
            mlp.up_proj.weight.T, bias(mlp.up_proj, mlp.up_proj.out_features), mlp.gate_proj.weight.T,
            mlp.down_proj.weight.T, bias(mlp.down_proj, d)))
    return ModelWeights(core.embed_tokens.weight, None, core.norm.weight, None, m.lm_head.weight,
                        getattr(m.lm_head, "bias", None), layers)
