"""Activation sites: what (a hook, maybe a head) + where (a position), in two spellings.

Paper notation (InversionView):  ``a1.0@:``   attention head 0 of layer 1, its result into the
residual stream, at the ``:`` position.  Other kinds: ``x0.pre`` ``x1.mid`` ``x1.post`` (residual
stream), ``m0`` (MLP out), ``attn0`` (whole attention output), ``q1.0`` ``k1.0`` ``v1.0`` ``z1.0``
``pattern1.0`` (per-head internals), ``emb`` ``pos`` (embeddings).  The paper's long names
``resid_pre0`` ``mlp_out1`` ... are accepted too.

TransformerLens notation: ``blocks.1.attn.hook_result[0]@:`` (head in brackets), e.g.
``blocks.0.hook_resid_pre@5``.  ``@POS`` is optional; without it a site covers every position.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError, choices_hint


@dataclass(frozen=True)
class SiteKind:
    """One kind of site: its short paper name, its hook, and whether it is per head."""

    name: str
    hook: str  # format string with {L}
    per_head: bool
    notation: str  # format string with {L} and {H}


KINDS: dict[str, SiteKind] = {
    k.name: k
    for k in (
        SiteKind("emb", "hook_embed", False, "emb"),
        SiteKind("pos", "hook_pos_embed", False, "pos"),
        SiteKind("resid_pre", "blocks.{L}.hook_resid_pre", False, "x{L}.pre"),
        SiteKind("resid_mid", "blocks.{L}.hook_resid_mid", False, "x{L}.mid"),
        SiteKind("resid_post", "blocks.{L}.hook_resid_post", False, "x{L}.post"),
        SiteKind("attn_out", "blocks.{L}.hook_attn_out", False, "attn{L}"),
        SiteKind("mlp_out", "blocks.{L}.hook_mlp_out", False, "m{L}"),
        SiteKind("mlp_post", "blocks.{L}.mlp.hook_post", False, "m{L}.post"),
        SiteKind("head", "blocks.{L}.attn.hook_result", True, "a{L}.{H}"),
        SiteKind("z", "blocks.{L}.attn.hook_z", True, "z{L}.{H}"),
        SiteKind("q", "blocks.{L}.attn.hook_q", True, "q{L}.{H}"),
        SiteKind("k", "blocks.{L}.attn.hook_k", True, "k{L}.{H}"),
        SiteKind("v", "blocks.{L}.attn.hook_v", True, "v{L}.{H}"),
        SiteKind("pattern", "blocks.{L}.attn.hook_pattern", True, "pattern{L}.{H}"),
    )
}

_NOTATION_RES = [
    (re.compile(r"^emb$"), "emb"),
    (re.compile(r"^pos$"), "pos"),
    (re.compile(r"^x(?P<L>\d+)\.pre$"), "resid_pre"),
    (re.compile(r"^x(?P<L>\d+)\.mid$"), "resid_mid"),
    (re.compile(r"^x(?P<L>\d+)\.post$"), "resid_post"),
    (re.compile(r"^attn(?P<L>\d+)$"), "attn_out"),
    (re.compile(r"^m(?P<L>\d+)$"), "mlp_out"),
    (re.compile(r"^m(?P<L>\d+)\.post$"), "mlp_post"),
    (re.compile(r"^a(?P<L>\d+)\.(?P<H>\d+)$"), "head"),
    (re.compile(r"^(?P<kind>[qkvz])(?P<L>\d+)\.(?P<H>\d+)$"), None),
    (re.compile(r"^pattern(?P<L>\d+)\.(?P<H>\d+)$"), "pattern"),
    # the paper's long names
    (re.compile(r"^(?P<kind>resid_pre|resid_mid|resid_post|mlp_out|attn_out)(?P<L>\d+)$"), None),
]
_HOOK_RE = re.compile(r"^(?:blocks\.(?P<L>\d+)\.)?(?P<hook>[a-z_.]+?)(?:\[(?P<H>\d+)\])?$")

NOTATION_HELP = (
    "emb, pos, x{L}.pre, x{L}.mid, x{L}.post, attn{L}, m{L}, m{L}.post, a{L}.{H}, q|k|v|z{L}.{H}, "
    "pattern{L}.{H}, resid_pre{L} ..., or a TransformerLens hook name such as "
    "blocks.{L}.attn.hook_result[{H}]; optionally followed by @POSITION"
)


@dataclass(frozen=True, order=True)
class Site:
    """A (kind, layer, head, position) tuple; ``position`` None means every position."""

    kind: str
    layer: int | None = None
    head: int | None = None
    position: str | int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CircuitkitError(f"unknown site kind {self.kind!r}; valid: {choices_hint(KINDS)}")
        k = KINDS[self.kind]
        if self.kind not in ("emb", "pos") and self.layer is None:
            raise CircuitkitError(f"site kind {self.kind!r} needs a layer")
        if k.per_head and self.head is None:
            raise CircuitkitError(f"site kind {self.kind!r} needs a head")
        if not k.per_head and self.head is not None:
            raise CircuitkitError(f"site kind {self.kind!r} has no heads")

    # ---- names ----------------------------------------------------------------------------
    @property
    def hook_name(self) -> str:
        return KINDS[self.kind].hook.format(L=self.layer)

    @property
    def node(self) -> str:
        """Paper notation without the position, e.g. ``a1.0``."""
        return KINDS[self.kind].notation.format(L=self.layer, H=self.head)

    def __str__(self) -> str:
        return self.node if self.position is None else f"{self.node}@{self.position}"

    def hook_str(self) -> str:
        """TransformerLens spelling, e.g. ``blocks.1.attn.hook_result[0]@:``."""
        s = self.hook_name + (f"[{self.head}]" if self.head is not None else "")
        return s if self.position is None else f"{s}@{self.position}"

    def at(self, position: str | int | None) -> Site:
        return replace(self, position=position)

    @property
    def stop_layer(self) -> int:
        """Blocks that must run to compute this site (``stop_at_layer`` for the runner)."""
        return 0 if self.layer is None else self.layer + 1

    # ---- reading activations --------------------------------------------------------------
    def select(self, act: Tensor, positions: Tensor | None = None) -> Tensor:
        """This site's slice of its hook's activation.

        act: the hook's tensor ([batch, pos, d], [batch, pos, head, d] or pattern
        [batch, head, q, k]).  positions: [batch] indices, or None for every position.
        Returns [batch, d] with positions, else [batch, pos, d] (pattern rows: d = key positions).
        """
        if self.kind == "pattern":
            act = act[:, self.head]  # [batch, q, k]
        elif KINDS[self.kind].per_head:
            act = act[:, :, self.head]
        if positions is None:
            return act
        return act[torch.arange(act.shape[0], device=act.device), positions.to(act.device)]


def parse_site(text: str) -> Site:
    """Parse either notation (see module docstring); errors name the valid forms."""
    raw = text.strip()
    if not raw:
        raise CircuitkitError(f"empty site; valid forms: {NOTATION_HELP}")
    name, _, pos_text = raw.partition("@")
    position: str | int | None = None
    if _:
        if pos_text == "":
            raise CircuitkitError(f"site {text!r} has '@' but no position after it")
        position = int(pos_text) if pos_text.lstrip("-").isdigit() else pos_text
    for rx, kind in _NOTATION_RES:
        m = rx.match(name)
        if m:
            g = m.groupdict()
            kind = kind or g["kind"]
            return Site(kind, _int(g.get("L")), _int(g.get("H")), position)
    m = _HOOK_RE.match(name)
    if m:
        layer, hook, head = _int(m["L"]), m["hook"], _int(m["H"])
        for k in KINDS.values():
            if k.hook.split("}.")[-1] == hook and ((layer is None) == ("{L}" not in k.hook)):
                return Site(k.name, layer, head, position)
    raise CircuitkitError(f"cannot parse site {text!r}; valid forms: {NOTATION_HELP}")


def _int(s: str | None) -> int | None:
    return None if s is None else int(s)


def check_site(site: Site, n_layers: int, n_heads: int) -> None:
    """Raise a clear error if the site does not exist in a model of this shape."""
    if site.layer is not None and not 0 <= site.layer < n_layers:
        raise CircuitkitError(f"site {site}: layer {site.layer} does not exist; the model has layers 0..{n_layers - 1}")
    if site.head is not None and not 0 <= site.head < n_heads:
        raise CircuitkitError(f"site {site}: head {site.head} does not exist; the model has heads 0..{n_heads - 1}")


def all_sites(n_layers: int, n_heads: int, kinds: Iterable[str] | None = None) -> list[Site]:
    """Every site of a model of this shape (positions unset), in forward order."""
    kinds = list(kinds) if kinds is not None else list(KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise CircuitkitError(f"unknown site kinds {sorted(unknown)}; valid: {choices_hint(KINDS)}")
    out = [Site(k) for k in ("emb", "pos") if k in kinds]
    for L in range(n_layers):
        for kind in ("resid_pre", "q", "k", "v", "pattern", "z", "head", "attn_out", "resid_mid", "mlp_post",
                     "mlp_out", "resid_post"):
            if kind not in kinds:
                continue
            if KINDS[kind].per_head:
                out += [Site(kind, L, h) for h in range(n_heads)]
            else:
                out.append(Site(kind, L))
    return out


def paper_sites(n_layers: int, n_heads: int, include_mlp: bool = True) -> list[Site]:
    """The sites InversionView decodes: x0.pre, then per layer every head, x.mid, (m), x.post."""
    out = [Site("resid_pre", 0)]
    for L in range(n_layers):
        out += [Site("head", L, h) for h in range(n_heads)]
        out.append(Site("resid_mid", L))
        if include_mlp:
            out.append(Site("mlp_out", L))
        out.append(Site("resid_post", L))
    return out


# ---- site groups: several sites patched together at one position ----
GROUP_SEP = " & "


def group_sites(spec: Site | str | Sequence[Site]) -> list[Site]:
    """The sites of a site or site group (``"a1.0@END & a1.2@END"``); a group's sites share one position."""
    if isinstance(spec, Site):
        return [spec]
    sites = [parse_site(x.strip()) for x in spec.split(GROUP_SEP)] if isinstance(spec, str) else list(spec)
    if len({x.position for x in sites}) > 1:
        raise CircuitkitError(f"a site group patches one position; got {', '.join(map(str, sites))}")
    return sites


def group_name(sites: Sequence[Site | str]) -> str:
    """The spelling of a site group, the inverse of ``group_sites``."""
    return GROUP_SEP.join(str(x) for x in sites)


def expand_sites(site_text: str | None, positions: str | None, pm) -> list[Site]:
    """Sites from "a0.0,a1.0@:" and "=,A1" (sites without a position get every listed position), checked against
    ``pm`` (a probed model: its layers, heads and task's named positions)."""
    task = pm.task
    if site_text:
        sites = [parse_site(s) for s in site_text.split(",") if s.strip()]
    else:
        sites = [s for s in paper_sites(pm.n_layers, pm.n_heads) if s.kind in ("head", "mlp_out")]
    pos_list = [p for p in (positions or "").split(",") if p]
    out = []
    for s in sites:
        check_site(s, pm.n_layers, pm.n_heads)
        if s.position is not None:
            out.append(s)
        elif pos_list:
            out += [s.at(int(p) if p.lstrip("-").isdigit() else p) for p in pos_list]
        else:
            raise CircuitkitError(f"site {s} has no position: write it as {s.node}@POS or pass --positions "
                                  f"(named positions of {task.name}: {', '.join(task.position_names)})")
    for p in {s.position for s in out}:
        if isinstance(p, str) and p not in task.position_names:
            raise CircuitkitError(f"unknown position {p!r} for {task.name}; valid: {', '.join(task.position_names)}"
                                  " or an integer index")
    return list(dict.fromkeys(out))
