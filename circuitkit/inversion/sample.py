"""Batched sampling from a decoder with a KV cache, over the paper's (temperature, noise) grid.

Sampling uses the Gumbel-max trick with noise drawn from a ``torch.Generator`` up front, so the
cached sampler and a full-forward reference sampler (tests/test_inversion.py) make identical draws.  Generation
starts from BOS, stops a row at EOS (later tokens are PAD) and runs at most ``seq_len`` tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuitkit.inversion.decoder import InversionDecoder

#: the paper's grid: (temperature, noise scale); 4 repeats of 64 per cell = 1024 samples a query
PAPER_GRID: tuple[tuple[float, float], ...] = ((0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (2.0, 0.1))


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int


def _gumbel(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    u = torch.rand(shape, generator=gen).clamp_(1e-10, 1 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


def grid_queries(query: Tensor, n: int, grid: Sequence[tuple[float, float]], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample activations [n_total, d] and temperatures [n_total] for ``n`` samples per grid cell.

    noise = N(0, 1) · scale · std(query), drawn per sample.
    """
    acts, temps = [], []
    std = query.float().std()
    for temp, scale in grid:
        a = query.float().unsqueeze(0).expand(n, -1).clone()
        if scale > 0:
            a = a + torch.randn(a.shape, generator=gen).to(a.device) * scale * std
        acts.append(a)
        temps.append(torch.full((n,), float(temp)))
    return torch.cat(acts), torch.cat(temps).to(query.device)


@torch.no_grad()
def sample(decoder: InversionDecoder, acts: Tensor, site_idx: Tensor | int, temps: Tensor | float,
           special: SpecialIds, gen: torch.Generator, max_len: int | None = None,
           batch_size: int = 1024) -> Tensor:
    """Sample inputs [n, max_len] (BOS first, PAD after EOS) for activations acts [n, d]."""
    n = acts.shape[0]
    dev = acts.device
    site_idx = torch.as_tensor(site_idx, device=dev).expand(n) if not torch.is_tensor(site_idx) or site_idx.ndim == 0 \
        else site_idx.to(dev)
    temps = torch.as_tensor(temps, dtype=torch.float, device=dev).expand(n)
    max_len = max_len or decoder.cfg.seq_len
    out = []
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        out.append(_sample_batch(decoder, acts[s:e], site_idx[s:e], temps[s:e], special, gen, max_len))
    return torch.cat(out)


def _sample_batch(decoder, acts, site_idx, temps, special, gen, max_len) -> Tensor:
    b, dev, V = acts.shape[0], acts.device, decoder.cfg.vocab_size
    ids = torch.full((b, max_len), special.pad, dtype=torch.long, device=dev)
    ids[:, 0] = special.bos
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    cache = decoder.start_cache(acts, site_idx)
    tok = ids[:, :1]
    for t in range(1, max_len):
        logits, cache = decoder.forward_cached(tok, cache, t - 1)
        nxt = (logits[:, -1] / temps.unsqueeze(1) + _gumbel((b, V), gen, dev)).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, special.pad), nxt)
        ids[:, t] = nxt
        done |= nxt == special.eos
        if bool(done.all()):
            break
        tok = nxt.unsqueeze(1)
    return ids
