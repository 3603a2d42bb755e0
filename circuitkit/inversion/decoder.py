"""The InversionView decoder: a small GPT-2 that generates inputs conditioned on an activation.

Conditioning (as in the paper's code): the query activation, scaled per site to unit RMS, is
concatenated with a learned site embedding and passed through ``n_cond_blocks`` residual MLP
blocks and a LayerNorm.  In every layer a Linear + LayerNorm turns that vector into one extra
*slot*: a key/value pair that every token position attends to (through the layer's own
``c_attn``), with no positional embedding.  During sampling the slot lives in the KV cache, so
conditioning costs nothing per generated token.  One decoder serves every site of a probed model.

Shapes: ``ids [batch, pos]``, ``act [batch, act_dim]``, ``site_idx [batch]``,
logits ``[batch, pos, vocab]``; a KV cache is a list (per layer) of ``(k, v)`` with
``k, v [batch, head, n_slots + pos_so_far, d_head]`` (the activation slots come first).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KVCache = list[tuple[Tensor, Tensor]]


@dataclass
class DecoderConfig:
    """Architecture of a decoder (the paper's: 2 layers, 4 heads, d_model 256, 6 MLP blocks)."""

    vocab_size: int
    seq_len: int
    act_dim: int
    n_sites: int
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    site_dim: int = 64
    cond_mid: int = 512
    n_cond_blocks: int = 6
    n_slots: int = 1  # activation slots per layer (the paper: 1); more give each head more to read
    ln_eps: float = 1e-5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _CondBlock(nn.Module):
    def __init__(self, dim: int, mid: int, eps: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mid)
        self.fc2 = nn.Linear(mid, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(self.ln(x))))


class _Block(nn.Module):
    """A pre-LN GPT-2 block whose attention has one extra key/value slot made from the condition."""

    def __init__(self, cfg: DecoderConfig, cond_dim: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, d // cfg.n_heads
        self.ln_1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.n_slots = cfg.n_slots
        # Linear to every slot at once, then a LayerNorm per slot (applied in slot_kv)
        self.slot = nn.Sequential(nn.Linear(cond_dim, cfg.n_slots * d), nn.LayerNorm(d, eps=cfg.ln_eps))

    def _heads(self, x: Tensor) -> Tensor:  # [b, t, d] -> [b, h, t, dh]
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def slot_kv(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the activation slots: each [b, h, n_slots, dh]."""
        lin, ln = self.slot
        slots = ln(lin(cond).view(cond.shape[0], self.n_slots, -1))  # [b, n_slots, d]
        _, k, v = self.c_attn(slots).split(self.c_attn.out_features // 3, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [b, t, d] (new positions); past: keys/values so far (slot first).  Returns (x, new past)."""
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
        n_keys = k.shape[2]
        if t == 1:
            att = F.scaled_dot_product_attention(q, k, v)
        else:  # query i (absolute n_keys - t + i) sees keys 0 .. n_keys - t + i
            qi = torch.arange(t, device=x.device).unsqueeze(1) + (n_keys - t)
            mask = torch.arange(n_keys, device=x.device).unsqueeze(0) <= qi
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.c_proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))
        return x, (k, v)


class InversionDecoder(nn.Module):
    """Decoder ``p(input | activation, site)``; see the module docstring."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cond_dim = cfg.act_dim + cfg.site_dim
        self.site_emb = nn.Embedding(cfg.n_sites, cfg.site_dim)
        self.cond_blocks = nn.ModuleList(_CondBlock(cond_dim, cfg.cond_mid, cfg.ln_eps) for _ in range(cfg.n_cond_blocks))
        self.cond_ln = nn.LayerNorm(cond_dim, eps=cfg.ln_eps)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg, cond_dim) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # per-site scale that brings activations to unit RMS (set from data before training)
        self.register_buffer("act_scale", torch.ones(cfg.n_sites))
        self.apply(self._init)
        for blk in self.blocks:  # GPT-2's scaled init of residual projections
            for lin in (blk.c_proj, blk.proj):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- conditioning ----------------------------------------------------------------------
    def condition(self, act: Tensor, site_idx: Tensor) -> Tensor:
        """act [b, act_dim], site_idx [b] -> condition vector [b, act_dim + site_dim]."""
        x = act / self.act_scale[site_idx].unsqueeze(1)
        x = torch.cat([x, self.site_emb(site_idx)], dim=-1)
        for blk in self.cond_blocks:
            x = blk(x)
        return self.cond_ln(x)

    def start_cache(self, act: Tensor, site_idx: Tensor) -> KVCache:
        """A KV cache holding only each layer's activation slot."""
        cond = self.condition(act, site_idx)
        return [blk.slot_kv(cond) for blk in self.blocks]

    # ---- forward -----------------------------------------------------------------------------
    def forward_cached(self, ids: Tensor, cache: KVCache, start: int) -> tuple[Tensor, KVCache]:
        """Run positions ``start .. start + t - 1`` (ids [b, t]) on top of ``cache``."""
        t = ids.shape[1]
        pos = torch.arange(start, start + t, device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        new: KVCache = []
        for blk, past in zip(self.blocks, cache):
            x, kv = blk(x, past)
            new.append(kv)
        return self.lm_head(self.ln_f(x)), new

    def forward(self, ids: Tensor, act: Tensor, site_idx: Tensor) -> Tensor:
        """Teacher-forced logits [b, t, vocab] for ids [b, t] (ids[:, 0] is BOS)."""
        logits, _ = self.forward_cached(ids, self.start_cache(act, site_idx), 0)
        return logits


