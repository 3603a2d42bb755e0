"""Edge-level faithfulness: the circuit run in which circuit nodes talk only along the given edges.

Let R0 be the residual stream of the fully ablated run (the base's embeddings plus every component's
output on the aligned source), at every depth (0 = embeddings; layer L's attention reads depth 2L and
writes 2L+1, its MLP reads 2L+1 and writes 2L+2; the final stream is depth 2·n_layers).  The
component nodes are processed in depth order; node r reads

    input_r = R0[read depth of r] + Σ over edges s→r of Δs   (Δs placed at s's rows / position)

where Δs = out_s(this run) − out_s(source) for a component node (a head's result z_h W_O[h], an
MLP's output, at the node's position), and Δs = clean base value − R0 at s's depth and position for
a residual node s (x{L}.pre / .mid / .post restored clean).  A head receiver at position p computes
its q at row p and its k, v at every row from input_r (one forward of its layer from input_r); an
MLP receiver at p computes its output at row p from input_r.  Edges s → "out:T" put Δs into the
final residual stream (at s's own rows: a node at another position than target T's cannot move T's
logits); target T's logits are read from R0[final] + Σ_{s→out:T} Δs.  Embedding sites (emb, pos,
x0.pre) are never ablated (they are part of R0), so edges from them carry nothing; residual and
embedding nodes read nothing, so edges into them are ignored; so are edges between non-nodes or
against the depth order unless ``strict`` (all listed in ``ignored_edges`` with the reason).

With the complete edge set (``complete_edges``: every upstream -> downstream pair of nodes plus every
node that sits at a target position -> out, minus the pairs a restored residual node overrides) this
reproduces node-level faithfulness exactly (up to float rounding).  Metrics and normalisation are the
evaluator's: (m(edges) − m(∅)) / (m(M) − m(∅)) for LD and accuracy, 1 − KL(edges)/KL(∅) for KL.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitkit.circuit.evaluate import (HEAD_KINDS, METRICS, MLP_KINDS, AblationEvaluator, as_sites, site_role,
                                         to_jsonable)
from circuitkit.errors import CircuitkitError
from circuitkit.patching.path import read_depth
from circuitkit.sites import Site, check_site, parse_site

DEFINITIONS = (__doc__ or "").split("\n", 1)[1].strip()
OUT = "out:"


@dataclass
class _Node:
    name: str
    site: Site
    role: str  # head / mlp / resid
    heads: list[int]
    read: int
    write: int
    rows: Tensor  # [n, pos] bool
    index: int


def _nodes(ev: AblationEvaluator, sites: Sequence[Site]) -> tuple[list[_Node], list[str]]:
    out, never = [], []
    for i, s in enumerate(sites):
        check_site(s, ev.L, ev.H)
        role = site_role(s)
        if role == "never_ablated":
            never.append(str(s))
            continue
        if role == "residual":
            d = read_depth(s)
            out.append(_Node(str(s), s, "resid", [], d, d, ev.rows(s.position), i))
        elif s.kind in MLP_KINDS:
            out.append(_Node(str(s), s, "mlp", [], 2 * s.layer + 1, 2 * s.layer + 2, ev.rows(s.position), i))
        else:
            heads = [s.head] if s.kind in HEAD_KINDS else list(range(ev.H))
            out.append(_Node(str(s), s, "head", heads, 2 * s.layer, 2 * s.layer + 1, ev.rows(s.position), i))
    return out, never


def _blocked(s: _Node, r_read: int, nodes: Sequence[_Node]) -> bool:
    """A restored residual node x at s's position between s's write and r's read overrides s."""
    for x in nodes:
        if x is s or x.role != "resid" or not (x.site.position is None or x.site.position == s.site.position):
            continue
        if s.write <= x.read <= r_read and (s.role != "resid" or s.read < x.read or x.index > s.index):
            return True
    return False


def complete_edges(evaluator: AblationEvaluator, sites: Iterable[Site | str]) -> list[tuple[str, str]]:
    """Every upstream -> downstream pair among the nodes (s writes at or before r reads) plus every node
    at a target position (in some input, or position-less) -> ``out:T``, without the pairs a restored
    residual node at the sender's position overrides.  With these edges edge-level faithfulness equals
    node-level faithfulness (exact when distinct position names never share an index)."""
    ev = evaluator
    nodes, _ = _nodes(ev, as_sites(sites))
    final = 2 * ev.L
    edges = []
    for r in nodes:
        if r.role == "resid":
            continue
        for s in nodes:
            if s is not r and s.write <= r.read and not _blocked(s, r.read, nodes):
                edges.append((s.name, r.name))
    for t, name in enumerate(ev.target_names):
        sel = ev.pair_target == t
        pi, pp = torch.as_tensor(ev.pair_input[sel]), ev._pair_pos[torch.as_tensor(sel)]
        for s in nodes:
            if bool(s.rows[pi, pp].any()) and not _blocked(s, final, nodes):
                edges.append((s.name, OUT + name))
    return edges


@dataclass
class EdgeFaithfulness:
    nodes: list[str]
    edges: list[list[str]]
    ignored_edges: list[list[str]]  # [sender, receiver, reason]
    n: int
    means: dict[str, dict[str, float]]  # metric -> target -> mean in the edge-restricted run
    normalized: dict[str, dict[str, float]]
    normalized_ci: dict[str, dict[str, list[float]]]
    faithfulness_normalized: dict[str, float]  # LD (primary)
    faithfulness_normalized_ci: dict[str, list[float]]
    definitions: str = field(default=DEFINITIONS)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def _name(x: str | Site) -> str:
    if isinstance(x, Site):
        return str(x)
    return x if x.startswith(OUT) else str(parse_site(x))


@torch.no_grad()
def edge_logits(evaluator: AblationEvaluator, sites: Iterable[Site | str],
                edges: Iterable[tuple[str | Site, str | Site]], strict: bool = False,
                ) -> tuple[list[Tensor], list[list[str]], list[list[str]]]:
    """Per batch, the pair logits of the edge-restricted circuit run (module doc); plus the edges
    used and the edges ignored ([sender, receiver, reason]; ``strict`` raises on an edge that is
    not between circuit nodes or runs against the depth order, instead of ignoring it)."""
    ev, pm = evaluator, evaluator.pm
    r_ = pm.runner
    sites = as_sites(sites)
    nodes, never = _nodes(ev, sites)
    by_name = {n.name: n for n in nodes}
    incoming: dict[str, list[_Node]] = {n.name: [] for n in nodes}
    outgoing: dict[str, list[_Node]] = {t: [] for t in ev.target_names}
    used: list[list[str]] = []
    ignored: list[list[str]] = []

    def skip(s: str, r: str, why: str) -> None:
        if strict:
            raise CircuitkitError(f"edge {s} -> {r}: {why}")
        ignored.append([s, r, why])

    for s_raw, r_raw in edges:
        try:
            s, r = _name(s_raw), _name(r_raw)
        except CircuitkitError as e:
            skip(str(s_raw), str(r_raw), f"not a site ({e})")
            continue
        if s in never:
            skip(s, r, "the sender is an embedding, never ablated (part of R0): the edge carries nothing")
        elif r in never or (r in by_name and by_name[r].role == "resid"):
            skip(s, r, "the receiver is a residual or embedding node: it reads nothing")
        elif s not in by_name:
            skip(s, r, f"{s} is not a circuit node ({', '.join(by_name) or 'none'})")
        elif r.startswith(OUT):
            t = r[len(OUT):]
            if t not in outgoing:
                skip(s, r, f"unknown target {t!r}; valid: {', '.join(ev.target_names)}")
                continue
            if by_name[s] not in outgoing[t]:
                outgoing[t].append(by_name[s])
            used.append([s, r])
        elif r not in by_name:
            skip(s, r, f"{r} is not a circuit node ({', '.join(by_name)})")
        elif by_name[s].write > by_name[r].read:
            skip(s, r, f"{s} is written after {r} reads the residual stream")
        else:
            if by_name[s] not in incoming[r]:
                incoming[r].append(by_name[s])
            used.append([s, r])
    order = sorted(nodes, key=lambda n: (n.role != "resid", n.read, n.index))  # residual nodes read nothing
    final = 2 * ev.L
    dev = ev.device
    chunks = []
    for sl in ev._batches():
        ids = ev.ids[sl].to(dev)
        delta: dict[str, Tensor] = {}
        for nd in order:
            rows = nd.rows[sl].to(dev)[..., None]
            if nd.role == "resid":
                delta[nd.name] = (ev.clean_resid(nd.site.hook_name)[sl] - ev.empty_resid(nd.read)[sl]) * rows
                continue
            x = ev.empty_resid(nd.read)[sl].clone()
            for s in incoming[nd.name]:
                x = x + delta[s.name]
            L, w = nd.site.layer, r_.layers[nd.site.layer]
            if nd.role == "head":
                hook = f"blocks.{L}.attn.hook_z"
                _, c = r_.run(ids, start_at_layer=L, stop_at_layer=L + 1, resid=x, cache=[hook], return_logits=False)
                dz = (c[hook] - ev.src_z[L][sl])[:, :, nd.heads]  # [b, pos, h, d_head]
                d = torch.einsum("bphe,hed->bpd", dz, w.W_O[nd.heads])
            else:
                h2 = F.layer_norm(x, (r_.d_model,), w.ln2_w, w.ln2_b, r_.eps)
                out = r_.act_fn(h2 @ w.W_in + w.b_in) @ w.W_out + w.b_out
                d = out - ev.src_mlp[L][sl]
            delta[nd.name] = d * rows
        ps = ev._pairs_of(sl)
        p_rows = torch.as_tensor(ev.pair_input[ps] - sl.start, device=dev)
        p_pos, p_tgt = ev._pair_pos[ps].to(dev), torch.as_tensor(ev.pair_target[ps], device=dev)
        pl = None
        groups: dict[tuple[str, ...], list[int]] = {}
        for t, name in enumerate(ev.target_names):
            groups.setdefault(tuple(sorted(s.name for s in outgoing[name])), []).append(t)
        for key, ts in groups.items():
            resid = ev.empty_resid(final)[sl].clone()
            for s in key:
                resid = resid + delta[s]
            logits, _ = r_.run(ids, start_at_layer=ev.L, resid=resid)
            sel = torch.isin(p_tgt, torch.tensor(ts, device=dev))
            got = logits[p_rows[sel], p_pos[sel]]
            if pl is None:
                pl = torch.zeros(len(p_rows), got.shape[-1], dtype=got.dtype, device=dev)
            pl[sel] = got
        chunks.append(pl)
    return chunks, used, ignored


def edge_faithfulness(evaluator: AblationEvaluator, sites: Iterable[Site | str],
                      edges: Iterable[tuple[str | Site, str | Site]], ci: bool = True,
                      strict: bool = False) -> EdgeFaithfulness:
    """Faithfulness of the circuit whose nodes read from each other only along ``edges`` (module doc).

    sites: the circuit's nodes; edges: (sender, receiver) pairs of node names, receiver a node or
    ``out:TARGET``."""
    ev = evaluator
    sites = as_sites(sites)
    chunks, used, ignored = edge_logits(ev, sites, edges, strict=strict)
    sc = ev.scores_from_pair_logits(chunks)
    means = {m: ev.means(sc.metric(m)) for m in METRICS}
    normalized, normalized_ci = {}, {}
    for m in METRICS:
        normalized[m], normalized_ci[m] = ev.normalized(sc, m, ci=ci)
    return EdgeFaithfulness(nodes=[str(s) for s in sites], edges=used, ignored_edges=ignored, n=ev.n, means=means,
                            normalized=normalized, normalized_ci=normalized_ci,
                            faithfulness_normalized=normalized["logit_diff"],
                            faithfulness_normalized_ci=normalized_ci["logit_diff"])


__all__ = ["EdgeFaithfulness", "complete_edges", "edge_faithfulness", "edge_logits", "DEFINITIONS"]
