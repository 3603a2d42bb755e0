"""Per-token colour of a sample: p(token | q) − p(token | the BOS-position activation at the same site).

Positive (blue): the query activation makes this token more likely than an uninformative
activation does; negative (red): less likely.  Computed teacher-forced with the decoder.
"""
from __future__ import annotations

import torch
from torch import Tensor

from circuitkit.inversion.checkpoint import TrainedDecoder
from circuitkit.inversion.data import site_activations
from circuitkit.sites import Site


@torch.no_grad()
def bos_activation(td: TrainedDecoder, site: Site, example_ids: Tensor) -> Tensor:
    """The site's activation at position 0 (BOS) — the same for every input of a causal model."""
    return site_activations(td.probed, site.at(None), example_ids[:1].to(td.probed.device))[0, 0]


@torch.no_grad()
def token_colours(td: TrainedDecoder, site: Site, ids: Tensor, query: Tensor, batch_size: int = 512) -> Tensor:
    """[n, pos] colour per token of samples ids [n, pos]; position 0 (BOS, given) gets 0."""
    idx = td.site_index(site)
    dec = td.decoder
    dev = next(dec.parameters()).device
    bos_act = bos_activation(td, site, ids)
    out = []
    for s in range(0, ids.shape[0], batch_size):
        chunk = ids[s:s + batch_size].to(dev)
        n = chunk.shape[0]
        sidx = torch.full((n,), idx, device=dev)
        p_q = dec(chunk, query.to(dev).expand(n, -1), sidx).softmax(-1)
        p_b = dec(chunk, bos_act.to(dev).expand(n, -1), sidx).softmax(-1)
        tgt = chunk[:, 1:].unsqueeze(-1)
        diff = p_q[:, :-1].gather(-1, tgt).squeeze(-1) - p_b[:, :-1].gather(-1, tgt).squeeze(-1)
        out.append(torch.cat([torch.zeros(n, 1, device=dev), diff], 1).cpu())
    return torch.cat(out)
