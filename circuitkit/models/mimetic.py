"""Mimetic initialisation of attention (Trockman & Kolter, 2023, "Mimetic Initialization of Self-Attention Layers").

Each attention layer starts with W_Q W_K^T ≈ α₁Z₁ + β₁I and W_V W_O ≈ α₂Z₂ − β₂I (Z random, entries
N(0, 1/d)), the structure trained attention layers show: a token attends to tokens like itself.
It is a generic initialiser, applied to every layer and head alike; it shortens the plateaus that a
small random init sits on (for counting: the mechanism that attends to the query letter's
occurrences forms within 30,000 steps instead of the ~700,000 of the paper's run).
"""
from __future__ import annotations

import math

import torch

#: (α₁, β₁) for W_Q W_K^T and (α₂, β₂) for W_V W_O: the values the paper recommends
MIMETIC_QK = (0.7, 0.7)
MIMETIC_VO = (0.4, 0.4)


def _factor(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with A @ B.T == m (square m [d, d]), split evenly through the SVD: A = U√S, B = V√S."""
    u, s, vh = torch.linalg.svd(m)
    root = s.sqrt()
    return u * root, vh.T * root


@torch.no_grad()
def mimetic_attention_init(model: torch.nn.Module, seed: int, qk: tuple[float, float] = MIMETIC_QK,
                           vo: tuple[float, float] = MIMETIC_VO) -> None:
    """Overwrite every attention head of an HF GPT-2 model in place with the mimetic structure.

    GPT-2's Conv1D weights are [in, out]: ``c_attn`` holds [W_Q | W_K | W_V] ([d, 3d]) and
    ``c_proj`` is W_O ([d, d]); a row vector x gives q = x W_Q, so head h's score is
    x W_Q[:, h] W_K[:, h]^T y^T. Each head gets the best rank-d_head approximation of its [d, d]
    target (the full target when there is one head).
    """
    gen = torch.Generator().manual_seed(seed)
    for block in model.transformer.h:
        attn = block.attn
        d = attn.c_proj.weight.shape[0]
        n_head = model.config.n_head
        dh = d // n_head
        dtype = attn.c_attn.weight.dtype
        for h in range(n_head):
            cols = slice(h * dh, (h + 1) * dh)
            z_qk = torch.randn(d, d, generator=gen) / math.sqrt(d)
            w_q, w_k = _factor(qk[0] * z_qk + qk[1] * torch.eye(d))  # [d, d] each, columns by singular value
            z_vo = torch.randn(d, d, generator=gen) / math.sqrt(d)
            w_v, w_o_t = _factor(vo[0] * z_vo - vo[1] * torch.eye(d))
            attn.c_attn.weight[:, cols] = w_q[:, :dh].to(dtype)
            attn.c_attn.weight[:, d:][:, cols] = w_k[:, :dh].to(dtype)
            attn.c_attn.weight[:, 2 * d:][:, cols] = w_v[:, :dh].to(dtype)
            attn.c_proj.weight[cols, :] = w_o_t[:, :dh].T.to(dtype)


__all__ = ["MIMETIC_QK", "MIMETIC_VO", "mimetic_attention_init"]
