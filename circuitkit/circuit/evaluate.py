"""Faithfulness, completeness and minimality of a circuit by resample ablation aligned by layout.

Sources.  For every evaluation input (the *base*) ONE source is drawn with
``task.fair_sources(base, rng, 1, hold=("layout",))``: another input with the same layout (same
length / template), so every position of the source lines up token by token with the base.
Bases for which the task finds no such source are skipped and counted (``n_skipped``).  Seeds:
default inputs ``task.generate(random.Random(40_000 + seed), n)``, sources drawn with
``random.Random(90_000 + seed)``, bootstrap ``numpy.random.default_rng(seed)``, random completeness
subsets ``random.Random(70_000 + seed)``.

Components and ablation.  The components are every attention head and every MLP at every position.
A component that is ablated outputs the value it has on the clean run of the base's source at the
same position (resample ablation); a component that is kept is computed live in the ablated run.
Heads are ablated at ``blocks.L.attn.hook_z`` (the head's result is ``z_h W_O[h]``, so replacing
``z_h`` replaces exactly that head's contribution; storing ``z`` costs d_head instead of d_model per
head), MLPs at ``blocks.L.hook_mlp_out``.  Embeddings (token and position, hence ``x0.pre``) are
never ablated: every run uses the base's own embeddings.

Circuit sites.  a{L}.{H} / z / q / k / v / pattern{L}.{H} -> head (L, H) at the site's position
(named positions resolved per input); attn{L} -> every head of layer L there; m{L} / m{L}.post ->
MLP L there; a site without a position covers every position.  A residual-stream site is a *bundle*:
it stands for every component written into the residual stream at its position up to its depth, all
computed live (nothing is restored to a clean value):
    x{L}.pre@p  = every head and MLP of the layers < L at p              (L >= 1)
    x{L}.mid@p  = those plus every head of layer L at p
    x{L}.post@p = every head and MLP of the layers <= L at p
A residual site without a position covers those components at every position.  Embeddings are never
ablated, so emb, pos and x0.pre cover no component (listed under ``never_ablated_sites``).  A bundle
holds only components at its own position: what they read from other positions is whatever the circuit
keeps live there (ablated unless some node covers it).  The components a circuit covers = the union of
its nodes' covers (a component node covers itself, a residual node its bundle); ``bundles`` in the
result lists each residual node's components.

Metrics, per (input, target) with the targets of ``task.targets``:
    LD   = logit(answer) - logit(competitor); competitor = the task's ``wrong`` token if set, else the
           source's answer at that target if it differs from the base's, else the clean full model's
           top non-answer token at that position (fixed once from the clean run);
    acc  = 1 if argmax == answer else 0;
    KL   = KL(clean full model || ablated run) of the next-token distribution at the target position.
m(X) is the mean over (input, target) pairs, per target name and pooled over all targets ("all").
M = full model (nothing ablated), ∅ = every component ablated,
C = the circuit (the components it covers live, everything else ablated),
M∖C = the components C covers ablated and everything else kept,
for K ⊆ C (K a set of the circuit's nodes, components or residual bundles): C∖K = the components covered
by the nodes of C not in K live, everything else ablated; M∖K = the components covered by K but by no
node of C outside K ablated, everything else kept (a component that another node of C still covers, e.g.
a head inside a residual bundle of C, stays live in both).

    faithfulness_normalized (LD, primary) = (m(C) − m(∅)) / (m(M) − m(∅))    (Marks et al. 2024)
    normalized accuracy                   = (acc(C) − acc(∅)) / (acc(M) − acc(∅))
    normalized KL                         = 1 − KL(C) / KL(∅)                  (KL(M) = 0)
    faithfulness (legacy)                 = acc(C) / acc(M)
    incompleteness(K) = |F(C∖K) − F(M∖K)| / |F(M) − F(∅)|, F = mean LD           (Wang et al. 2022)
        for K in {∅, every node of C, each single node, random subsets} (embedding nodes excluded)
    completeness      = 1 − max_K incompleteness(K)
    minimality[v]     = (F(C) − F(C∖{v})) / (F(M) − F(∅))  (0 for a node whose components other nodes
                        of C still cover, e.g. a head inside a residual bundle of C: removing it removes nothing)
    minimal           = every node's pooled minimality > min_contribution
95% CIs: percentile bootstrap over inputs (inputs resampled with replacement, every ratio
recomputed on each resample).  A ratio whose denominator is ~0 is undefined (null).  A normalisation is
undefined for an answer where m(M) <= m(∅) (or KL(∅) <= KL_MIN): the full model does no better there than
the ablated one, so the ratio says nothing (an EOS that every input ends with); such answers are reported
as undefined and left out of the pooled "all".
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuitkit import shards
from circuitkit.circuit.incremental import ResidualReferences, last_block_at_pairs
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching import engine
from circuitkit.patching.engine import Blend, Record
from circuitkit.results import JsonResult, to_jsonable
from circuitkit.sites import Site, check_site, parse_site

HEAD_KINDS = {"head", "z", "q", "k", "v", "pattern"}
MLP_KINDS = {"mlp_out", "mlp_post"}
RESID_KINDS = {"resid_pre", "resid_mid", "resid_post"}
METRICS = ("logit_diff", "accuracy", "kl")
CONDITIONS = ("full", "empty", "circuit", "complement")
_EPS = 1e-9
#: below this mean KL(∅) (nats) ablating everything leaves an answer's distribution as it was: 1 − KL(C)/KL(∅)
#: would divide by noise, so the normalised KL is undefined there
KL_MIN = 1e-4

DEFINITIONS = (__doc__ or "").split("\n", 1)[1].strip()


def site_role(site: Site) -> str:
    """``component`` (a head / MLP / whole attention layer), ``residual`` (a bundle: every head and MLP
    written into the residual stream at its position up to its depth, computed live; see
    ``bundle_components``) or ``never_ablated`` (emb, pos, x0.pre: embeddings only, covers nothing)."""
    if site.kind in ("emb", "pos") or (site.kind == "resid_pre" and site.layer == 0):
        return "never_ablated"
    if site.kind in RESID_KINDS:
        return "residual"
    return "component"


def is_component(site: Site) -> bool:
    return site_role(site) == "component"


def bundle_components(site: Site, n_heads: int) -> list[Site]:
    """The components a residual site stands for, at the site's own position (None: every position),
    in forward order: x{L}.pre -> a{l}.0..a{l}.{H-1}, m{l} for l < L; x{L}.mid -> those plus
    a{L}.0..a{L}.{H-1}; x{L}.post -> heads and MLPs of layers <= L.  [] for any other site."""
    if site_role(site) != "residual":
        return []
    L, p = site.layer, site.position
    full = L if site.kind in ("resid_pre", "resid_mid") else L + 1  # layers whose heads and MLP are all in
    out: list[Site] = []
    for lay in range(full):
        out += [Site("head", lay, h, p) for h in range(n_heads)]
        out.append(Site("mlp_out", lay, None, p))
    if site.kind == "resid_mid":
        out += [Site("head", L, h, p) for h in range(n_heads)]
    return out


def covered_components(site: Site, n_heads: int) -> list[Site]:
    """What a site covers: a component itself, a residual site its bundle, an embedding site nothing."""
    role = site_role(site)
    return [site] if role == "component" else bundle_components(site, n_heads) if role == "residual" else []


def as_sites(sites: Iterable[Site | str]) -> list[Site]:
    """Parse and de-duplicate (order kept); a verifier group name ``a & b`` is split into its sites."""
    out: list[Site] = []
    for s in sites:
        parts = [parse_site(p) for p in s.split(" & ")] if isinstance(s, str) else [s]
        for p in parts:
            if p not in out:
                out.append(p)
    return out


def _ratio(a: float, b: float) -> float:
    return float(a / b) if abs(b) > _EPS else float("nan")


def _ratio_arr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(b) > _EPS, a / np.where(np.abs(b) > _EPS, b, 1.0), np.nan)


def _ci(samples: np.ndarray) -> list[float]:
    """95% percentile interval of bootstrap samples [B] (NaN samples dropped)."""
    x = samples[~np.isnan(samples)]
    if x.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


@dataclass
class Scores:
    """Per (input, target) pair metrics of one run: arrays [P] in the evaluator's pair order."""

    logit_diff: np.ndarray
    accuracy: np.ndarray
    kl: np.ndarray

    def metric(self, name: str) -> np.ndarray:
        if name not in METRICS:
            raise CircuitkitError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
        return getattr(self, name)


@dataclass
class Mask:
    """Which components are kept live: heads [L, n, pos, H], mlps [L, n, pos] (True = live)."""

    heads: Tensor
    mlps: Tensor

    def __or__(self, o: Mask) -> Mask:
        return Mask(self.heads | o.heads, self.mlps | o.mlps)

    def __and__(self, o: Mask) -> Mask:
        return Mask(self.heads & o.heads, self.mlps & o.mlps)

    def __invert__(self) -> Mask:
        return Mask(~self.heads, ~self.mlps)


class AblationEvaluator:
    """Aligned resample ablation on a fixed set of (base, source) pairs, built once and reused.

    Caches: the sources' head ``z`` and MLP outputs at every layer, the clean run's metrics and
    log-probabilities at every target, the fully ablated run's residual stream (on demand, for edge
    faithfulness) and the clean residual stream at a hook (on demand, only for explicit ``run(...,
    restores)`` calls: no circuit evaluation restores anything).  Every ablated evaluation is then one
    forward pass per batch with ``torch.where`` hooks; with ``incremental`` (the default) it starts at the
    deepest block whose input a recent run shares and computes the last block at the target rows only
    (``circuitkit.circuit.incremental``; equal to the full pass up to float rounding).  ``resid_cache_mib``
    bounds the residual streams kept for that.  Under torch.distributed each batch of an ablated run runs on one
    rank and every rank gets all the scores, equal to one process's (``circuitkit.shards``).
    """

    def __init__(self, pm: ProbedModel, inputs: Sequence[str] | None = None, n: int = 1000, seed: int = 0,
                 batch_size: int = 256, n_boot: int = 1000, incremental: bool = True,
                 resid_cache_mib: float = 512.0) -> None:
        task = pm.task
        self.pm, self.task, self.seed, self.batch_size, self.n_boot = pm, task, seed, batch_size, n_boot
        self.incremental = incremental
        self._refs = ResidualReferences(pm.n_layers, int(resid_cache_mib * 2**20))
        if inputs is None:
            inputs = task.generate(random.Random(40_000 + seed), n)
        inputs = list(inputs)[:n]
        rng = random.Random(90_000 + seed)
        bases, sources = [], []
        for text in inputs:
            src = task.fair_sources(text, rng, 1, hold=("layout",))
            if src:
                bases.append(text)
                sources.append(src[0])
        self.n_skipped = len(inputs) - len(bases)
        if not bases:
            raise CircuitkitError(f"{task.name}: none of the {len(inputs)} evaluation inputs has an aligned source "
                                  "(same layout); cannot resample-ablate")
        self.inputs, self.sources = bases, sources
        self.ids, self.src_ids = task.encode(bases), task.encode(sources)
        self.n, self.seq = self.ids.shape
        self.L, self.H = pm.n_layers, pm.n_heads
        # keep block inputs only when one run's set of them fits the cache (else only the last-block saving applies)
        w = pm.runner.W_E
        self._remember = incremental and self._refs.fits(self.n * self.seq * w.shape[-1] * (self.L - 1) * w.element_size())
        self.device = pm.device
        self._pos: dict[str | int, Tensor] = {}
        self._clean_resid: dict[str, Tensor] = {}
        self._empty_resid: dict[int, Tensor] | None = None
        self._memo: dict[tuple, Scores] = {}
        self._build_pairs()
        with torch.no_grad():
            self._cache_sources()
            self._clean_run()
        self.full = self._scores_from_clean()
        self.empty = self.run(self.none_mask())
        self._boot_w = np.random.default_rng(seed).multinomial(self.n, np.full(self.n, 1.0 / self.n),
                                                                size=n_boot).astype(float)  # [B, n]

    # ---- setup --------------------------------------------------------------------------------
    def _build_pairs(self) -> None:
        task = self.task
        names: list[str] = []
        inp, tgt, pos, ans, task_wrong, src_ans = [], [], [], [], [], []
        off = [0]
        for i, (row, srow) in enumerate(zip(self.ids.tolist(), self.src_ids.tolist())):
            toks, stoks = task.tokenizer.id_tokens(row), task.tokenizer.id_tokens(srow)
            try:
                stargets = task.targets(stoks)
            except (CircuitkitError, ValueError, IndexError, KeyError):
                stargets = []
            for t in task.targets(toks):
                if t.name not in names:
                    names.append(t.name)
                same = [s for s in stargets if s.name == t.name]
                same = [s for s in same if s.position == t.position] or same
                inp.append(i)
                tgt.append(names.index(t.name))
                pos.append(t.position)
                ans.append(t.token)
                task_wrong.append(-1 if t.wrong is None else t.wrong)
                src_ans.append(same[0].token if same else -1)
            off.append(len(inp))
        if not inp:
            raise CircuitkitError(f"{task.name}: the evaluation inputs have no targets")
        self.target_names = names
        self.pair_input = np.array(inp)
        self.pair_target = np.array(tgt)
        self._pair_pos = torch.tensor(pos)
        self._pair_answer = torch.tensor(ans)
        self._task_wrong = torch.tensor(task_wrong)
        self._src_answer = torch.tensor(src_ans)
        self._pair_off = off
        self.P = len(inp)
        # per-input sums / counts per target column (last column: all) for bootstrap means
        T = len(names)
        self._cols = T + 1
        cnt = np.zeros((self.n, T + 1))
        np.add.at(cnt, (self.pair_input, self.pair_target), 1.0)
        cnt[:, T] = cnt[:, :T].sum(1)
        self._counts = cnt

    def _batches(self) -> Iterable[slice]:
        for a in range(0, self.n, self.batch_size):
            yield slice(a, min(a + self.batch_size, self.n))

    def _pairs_of(self, sl: slice) -> slice:
        return slice(self._pair_off[sl.start], self._pair_off[sl.stop])

    def _cache_sources(self) -> None:
        names = [h for L in range(self.L) for h in (f"blocks.{L}.attn.hook_z", f"blocks.{L}.hook_mlp_out")]
        parts: dict[str, list[Tensor]] = {h: [] for h in names}
        for sl in self._batches():
            _, c = self.pm.runner.run(self.src_ids[sl].to(self.device), cache=names, return_logits=False)
            for h in names:
                parts[h].append(c[h])
        self.src_z = [torch.cat(parts[f"blocks.{L}.attn.hook_z"]) for L in range(self.L)]
        self.src_mlp = [torch.cat(parts[f"blocks.{L}.hook_mlp_out"]) for L in range(self.L)]

    def _pair_logits(self, logits: Tensor, sl: slice) -> Tensor:
        ps = self._pairs_of(sl)
        rows = torch.as_tensor(self.pair_input[ps] - sl.start, device=logits.device)
        return logits[rows, self._pair_pos[ps].to(logits.device)]

    def _prefix_hooks(self) -> list[str]:
        """The hooks whose activations enter blocks 1 .. L-1 (what ``ResidualReferences`` keeps)."""
        return [f"blocks.{L}.hook_resid_pre" for L in range(1, self.L)]

    def _clean_run(self) -> None:
        lps, comps, kinds = [], [], []
        prefix: dict[str, list[Tensor]] = {h: [] for h in self._prefix_hooks()} if self._remember else {}
        for sl in self._batches():
            logits, c = self.pm.runner.run(self.ids[sl].to(self.device), cache=list(prefix))
            for h in prefix:
                prefix[h].append(c[h])
            pl = self._pair_logits(logits, sl).float()
            ps = self._pairs_of(sl)
            ans = self._pair_answer[ps].to(pl.device)
            other = pl.clone()
            other[torch.arange(len(ans), device=pl.device), ans] = -float("inf")
            top = other.argmax(-1).cpu()
            tw, sa = self._task_wrong[ps], self._src_answer[ps]
            use_src = (sa >= 0) & (sa != self._pair_answer[ps])
            comp = torch.where(tw >= 0, tw, torch.where(use_src, sa, top))
            kinds.append(torch.where(tw >= 0, 0, torch.where(use_src, 1, 2)))
            comps.append(comp)
            lps.append(pl.log_softmax(-1))
        self._pair_comp = torch.cat(comps)
        k = torch.cat(kinds)
        self.competitors = {"task": int((k == 0).sum()), "source": int((k == 1).sum()),
                            "top_other": int((k == 2).sum())}
        self._clean_lp = torch.cat(lps)  # [P, vocab] on the model's device
        if self._remember:
            full = ~self.none_mask()
            self._refs.add(full.heads, full.mlps, {L: torch.cat(prefix[f"blocks.{L}.hook_resid_pre"])
                                                   for L in range(1, self.L)}, pinned=True)

    def _score_batch(self, pl: Tensor, ps: slice) -> tuple[Tensor, Tensor, Tensor]:
        pl = pl.float()
        ans = self._pair_answer[ps].to(pl.device)
        comp = self._pair_comp[ps].to(pl.device)
        r = torch.arange(pl.shape[0], device=pl.device)
        ld = pl[r, ans] - pl[r, comp]
        acc = (pl.argmax(-1) == ans).float()
        cl = self._clean_lp[ps]
        kl = (cl.exp() * (cl - pl.log_softmax(-1))).sum(-1).clamp_min(0.0)
        return ld.cpu(), acc.cpu(), kl.cpu()

    def _scores_from_clean(self) -> Scores:
        lds, accs = [], []
        for sl in self._batches():
            ps = self._pairs_of(sl)
            lp = self._clean_lp[ps]
            ld, acc, _ = self._score_batch(lp, ps)  # log-softmax shifts every logit equally: same LD, argmax
            lds.append(ld)
            accs.append(acc)
        return Scores(torch.cat(lds).double().numpy(), torch.cat(accs).double().numpy(), np.zeros(self.P))

    def scores_from_pair_logits(self, chunks: Sequence[Tensor]) -> Scores:
        """Scores from per-batch pair logits ([pairs of batch, vocab], batches in order)."""
        out = [self._score_batch(pl, self._pairs_of(sl)) for pl, sl in zip(chunks, self._batches())]
        return Scores(*(torch.cat([o[j] for o in out]).double().numpy() for j in range(3)))

    # ---- positions and masks --------------------------------------------------------------------
    def positions(self, position: str | int) -> Tensor:
        """[n] index of ``position`` in each base input (-1 where the input does not have it)."""
        if position not in self._pos:
            out = []
            for row in self.ids.tolist():
                try:
                    out.append(self.task.resolve_position(position, self.task.tokenizer.id_tokens(row)))
                except CircuitkitError:
                    out.append(-1)
            self._pos[position] = torch.tensor(out, dtype=torch.long)
        return self._pos[position]

    def rows(self, position: str | int | None) -> Tensor:
        """Bool [n, pos]: where a site at ``position`` sits in each input (None: every position)."""
        if position is None:
            return torch.ones(self.n, self.seq, dtype=torch.bool)
        idx = self.positions(position)
        m = torch.zeros(self.n, self.seq, dtype=torch.bool)
        ok = idx >= 0
        m[torch.arange(self.n)[ok], idx[ok]] = True
        return m

    def named_rows(self) -> Tensor:
        """Bool [n, pos]: positions that carry at least one of the task's position names."""
        m = torch.zeros(self.n, self.seq, dtype=torch.bool)
        for name in self.task.position_names:
            m |= self.rows(name)
        return m

    def none_mask(self) -> Mask:
        return Mask(torch.zeros(self.L, self.n, self.seq, self.H, dtype=torch.bool),
                    torch.zeros(self.L, self.n, self.seq, dtype=torch.bool))

    def rest_mask(self) -> Mask:
        """Every component at a position that has no name in that input."""
        un = ~self.named_rows()
        m = self.none_mask()
        m.heads[:] = un[None, :, :, None]
        m.mlps[:] = un[None]
        return m

    def bundle(self, site: Site | str) -> list[Site]:
        """The components of a residual site's bundle (module doc); [] for any other site."""
        site = as_sites([site])[0]
        check_site(site, self.L, self.H)
        return bundle_components(site, self.H)

    def mask(self, sites: Iterable[Site | str]) -> Mask:
        """Components covered by ``sites``: a component site itself, a residual site its bundle (every
        head and MLP written into the stream at its position up to its depth), an embedding site none."""
        m = self.none_mask()
        for s0 in as_sites(sites):
            check_site(s0, self.L, self.H)
            for s in covered_components(s0, self.H):
                r = self.rows(s.position)
                if s.kind in HEAD_KINDS:
                    m.heads[s.layer, :, :, s.head] |= r
                elif s.kind == "attn_out":
                    m.heads[s.layer] |= r[:, :, None]
                elif s.kind in MLP_KINDS:
                    m.mlps[s.layer] |= r
                else:  # pragma: no cover - every kind is classified above
                    raise CircuitkitError(f"site {s} is not a component")
        return m

    # ---- clean and ablated residual streams ------------------------------------------------------
    def clean_resid(self, hook: str) -> Tensor:
        """The base's clean activation at a residual hook, [n, pos, d_model] (cached; used only by
        explicit ``run(keep, restores)`` calls)."""
        if hook not in self._clean_resid:
            L = int(hook.split(".")[1]) if hook.startswith("blocks.") else 0
            stop = L + 1 if L + 1 < self.L else None
            parts = []
            with torch.no_grad():
                for sl in self._batches():
                    _, c = self.pm.runner.run(self.ids[sl].to(self.device), cache=[hook], stop_at_layer=stop,
                                              return_logits=False)
                    parts.append(c[hook])
            self._clean_resid[hook] = torch.cat(parts)
        return self._clean_resid[hook]

    def empty_resid(self, depth: int) -> Tensor:
        """R0: the residual stream of the fully ablated run at ``depth`` (0 = embeddings, layer L's
        attention reads 2L and writes 2L+1, its MLP reads 2L+1 and writes 2L+2), [n, pos, d_model]."""
        if self._empty_resid is None:
            names = [h for L in range(self.L) for h in (f"blocks.{L}.hook_resid_pre", f"blocks.{L}.hook_resid_mid")]
            names.append(f"blocks.{self.L - 1}.hook_resid_post")
            parts: dict[str, list[Tensor]] = {h: [] for h in names}
            none = self.none_mask()
            with torch.no_grad():
                for sl in self._batches():
                    c: dict[str, Tensor] = {}
                    engine.run(self.pm.runner, self.ids[sl].to(self.device),
                               [*self._interventions(none, [], sl), Record(names, c)], need_logits=False)
                    for h in names:
                        parts[h].append(c[h])
            full = {h: torch.cat(v) for h, v in parts.items()}
            self._empty_resid = {2 * L: full[f"blocks.{L}.hook_resid_pre"] for L in range(self.L)}
            self._empty_resid.update({2 * L + 1: full[f"blocks.{L}.hook_resid_mid"] for L in range(self.L)})
            self._empty_resid[2 * self.L] = full[f"blocks.{self.L - 1}.hook_resid_post"]
        return self._empty_resid[depth]

    # ---- ablated runs ---------------------------------------------------------------------------
    def _interventions(self, keep: Mask, restores: Sequence[Site], sl: slice) -> list[Blend]:
        """The ablated run of batch ``sl`` as engine interventions: every head (z) and MLP output outside
        ``keep`` takes the source's value; the residual sites in ``restores`` take their clean base value."""
        dev, out = self.device, []
        for L in range(self.L):
            hk = keep.heads[L, sl]
            if not bool(hk.all()):
                out.append(Blend(f"blocks.{L}.attn.hook_z", ~hk.to(dev)[..., None], self.src_z[L][sl]))
            mk = keep.mlps[L, sl]
            if not bool(mk.all()):
                out.append(Blend(f"blocks.{L}.hook_mlp_out", ~mk.to(dev)[..., None], self.src_mlp[L][sl]))
        by_hook: dict[str, Tensor] = {}
        for s in restores:
            if site_role(s) != "residual":
                continue
            by_hook[s.hook_name] = by_hook.get(s.hook_name, torch.zeros(self.n, self.seq, dtype=torch.bool)) \
                | self.rows(s.position)
        out += [Blend(h, rm[sl].to(dev)[..., None], self.clean_resid(h)[sl]) for h, rm in by_hook.items()]
        return out

    @torch.no_grad()
    def run(self, keep: Mask, restores: Sequence[Site | str] = ()) -> Scores:
        """Scores with the components in ``keep`` live and every other one from the source.  Only for
        callers that ask for it explicitly: the residual sites in ``restores`` are overwritten with their
        clean base value (circuit scores never restore; a residual circuit node is a live bundle)."""
        restores = as_sites(restores)
        if self.incremental and not restores:
            return self.scores_from_pair_logits(self._incremental_pair_logits(keep))
        chunks: dict[int, Tensor] = {}
        for k, sl in enumerate(self._batches()):
            if shards.is_mine(k):
                logits = engine.run(self.pm.runner, self.ids[sl].to(self.device),
                                    self._interventions(keep, restores, sl))
                chunks[k] = self._pair_logits(logits, sl)
        return self.scores_from_pair_logits(self._merged(chunks))

    def _zero_rows(self, sl: slice) -> Tensor:
        """Zeros shaped like batch ``sl``'s residual stream, [rows, pos, d_model]."""
        w = self.pm.runner.W_E
        return torch.zeros(sl.stop - sl.start, self.seq, w.shape[-1], dtype=w.dtype, device=self.device)

    def _merged(self, chunks: dict[int, Tensor]) -> list[Tensor]:
        """Per-batch pair logits [pairs of batch, vocab], batches in order, from this rank's ``chunks`` (batch index
        -> logits) and, under torch.distributed, every other rank's (each batch runs on one rank:
        ``circuitkit.shards``)."""
        spans = [self._pairs_of(sl) for sl in self._batches()]
        if shards.world()[1] == 1:
            return [chunks[k] for k in range(len(spans))]
        full = torch.zeros(self.P, self._clean_lp.shape[-1], dtype=self.pm.runner.W_E.dtype, device=self.device)
        for k, pl in chunks.items():
            full[spans[k]] = pl
        full = shards.sum_disjoint(full)
        return [full[ps] for ps in spans]

    def _incremental_pair_logits(self, keep: Mask) -> list[Tensor]:
        """Per-batch pair logits of ``run(keep)``: from the deepest block input a remembered run shares,
        the last block at the target rows only (``circuitkit.circuit.incremental``); remembers this run."""
        r, dev, last = self.pm.runner, self.device, self.L - 1
        start, shared = self._refs.best_start(keep.heads, keep.mlps)
        computed = list(range(start + 1, self.L))  # block inputs this run computes (and remembers)
        parts: dict[int, list[Tensor]] = {L: [] for L in computed}
        chunks: dict[int, Tensor] = {}
        for k, sl in enumerate(self._batches()):
            if not shards.is_mine(k):  # another rank's batch: placeholders keep the remembered streams aligned
                if self._remember:
                    for L in computed:
                        parts[L].append(self._zero_rows(sl))
                continue
            ids = self.ids[sl].to(dev)
            x = shared[start][sl] if start > 0 else None
            if start < last:  # blocks start .. L-2 in full, keeping each next block's input
                names = [f"blocks.{L - 1}.hook_resid_post" for L in computed]
                c = {}
                engine.run(r, ids, [*self._interventions(keep, [], sl), Record(names, c)], resid={start: x},
                           start_at_layer=start, stop_at_layer=last)
                if self._remember:
                    for L in computed:
                        parts[L].append(c[f"blocks.{L - 1}.hook_resid_post"])
                x = c[f"blocks.{last - 1}.hook_resid_post"]
            elif x is None:  # a one-layer model: the last block reads the embeddings
                x = r.embed(ids)
            ps = self._pairs_of(sl)
            rows = torch.as_tensor(self.pair_input[ps] - sl.start, device=dev)
            chunks[k] = last_block_at_pairs(r, x, rows, self._pair_pos[ps].to(dev), keep.heads[last, sl].to(dev),
                                            keep.mlps[last, sl].to(dev), self.src_z[last][sl], self.src_mlp[last][sl])
        if self._remember:
            resid = {L: shared[L] for L in range(1, start + 1)}
            resid.update({L: torch.cat(parts[L]) for L in computed})
            self._refs.add(keep.heads, keep.mlps, resid)
        return self._merged(chunks)

    def score(self, keep_sites: Iterable[Site | str], ablate: Iterable[Site | str] = (),
              complement: bool = False) -> Scores:
        """Scores of the circuit ``keep_sites`` (the components they cover live, residual sites as live
        bundles, the rest ablated; nothing restored), with every component ``ablate`` covers ablated as
        well, even one that ``keep_sites`` covers.  ``complement=True`` gives M∖C instead: the
        components ``keep_sites`` cover ablated, everything else live.  Memoised.  (Removing nodes
        from a circuit, C∖K and M∖K, is ``score_removed``.)"""
        keep_sites, ablate = as_sites(keep_sites), as_sites(ablate)
        key = (tuple(sorted(map(str, keep_sites))), tuple(sorted(map(str, ablate))), complement)
        if key not in self._memo:
            keep = ~self.mask(keep_sites) if complement else self.mask(keep_sites)
            if ablate:
                keep = keep & ~self.mask(ablate)
            self._memo[key] = self.run(keep)
        return self._memo[key]

    def score_removed(self, nodes: Iterable[Site | str], removed: Iterable[Site | str],
                      complement: bool = False) -> Scores:
        """C∖K (``complement=False``) or M∖K (``True``) for the circuit C = ``nodes`` and K = ``removed``
        (nodes of C): C∖K keeps live exactly what the nodes of C outside K cover; M∖K ablates what K
        covers and no node of C outside K covers, everything else live.  Memoised."""
        nodes, removed = as_sites(nodes), as_sites(removed)
        rest = [s for s in nodes if s not in removed]
        if not complement:
            return self.score(rest)
        key = ("removed", tuple(sorted(map(str, nodes))), tuple(sorted(map(str, removed))))
        if key not in self._memo:
            self._memo[key] = self.run(~(self.mask(removed) & ~self.mask(rest)))
        return self._memo[key]

    # ---- aggregation ------------------------------------------------------------------------------
    def _sums(self, values: np.ndarray) -> np.ndarray:
        T = len(self.target_names)
        s = np.zeros((self.n, T + 1))
        np.add.at(s, (self.pair_input, self.pair_target), values)
        s[:, T] = s[:, :T].sum(1)
        return s

    def means(self, values: np.ndarray) -> dict[str, float]:
        """Mean over (input, target) pairs per target name and pooled ("all")."""
        tot, cnt = self._sums(values).sum(0), self._counts.sum(0)
        return {k: _ratio(tot[j], cnt[j]) for j, k in enumerate(self.target_names + ["all"])}

    def boot_means(self, values: np.ndarray) -> np.ndarray:
        """Bootstrap means [B, targets + 1] (inputs resampled with replacement; last column: all)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self._boot_w @ self._sums(values)) / (self._boot_w @ self._counts)

    def defined_targets(self, metric: str = "logit_diff") -> list[str]:
        """Answers whose normalisation means something: the full model beats the fully ablated one on them
        (m(M) > m(∅)), or for KL, ablating everything moves their distribution (KL(∅) > ``KL_MIN``).  The
        others are undefined (null, "undefined" in reports) and left out of "all"."""
        m, e = self.means(self.full.metric(metric)), self.means(self.empty.metric(metric))
        if metric == "kl":
            return [k for k in self.target_names if e[k] == e[k] and e[k] > KL_MIN]
        return [k for k in self.target_names if m[k] == m[k] and e[k] == e[k] and m[k] - e[k] > _EPS]

    def _pooled(self, values: np.ndarray, cols: list[int]) -> tuple[dict[str, float], np.ndarray]:
        """Means per target and "all" pooled over the columns ``cols`` only, with their bootstrap [B, T + 1]."""
        sums, counts = self._sums(values), self._counts.copy().astype(float)
        sums[:, -1], counts[:, -1] = sums[:, cols].sum(1), counts[:, cols].sum(1)
        tot, cnt = sums.sum(0), counts.sum(0)
        point = {k: _ratio(tot[j], cnt[j]) for j, k in enumerate(self.target_names + ["all"])}
        with np.errstate(divide="ignore", invalid="ignore"):
            return point, (self._boot_w @ sums) / (self._boot_w @ counts)

    def normalized(self, scores: Scores, metric: str = "logit_diff",
                   ci: bool = True) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Normalised faithfulness of ``scores`` per target and "all" (pooled over the answers whose
        normalisation is defined, ``defined_targets``; NaN for the others), with bootstrap CIs."""
        keys = self.target_names + ["all"]
        defined = set(self.defined_targets(metric))
        cols = [j for j, k in enumerate(self.target_names) if k in defined]
        (mc, bc), (mm, bm), (me, be) = (self._pooled(x, cols) for x in (
            scores.metric(metric), self.full.metric(metric), self.empty.metric(metric)))
        if metric == "kl":
            point = {k: 1.0 - _ratio(mc[k], me[k]) for k in keys}
        else:
            point = {k: _ratio(mc[k] - me[k], mm[k] - me[k]) for k in keys}
        point = {k: (v if k in defined or (k == "all" and cols) else float("nan")) for k, v in point.items()}
        if not ci:
            return point, {}
        boot = 1.0 - _ratio_arr(bc, be) if metric == "kl" else _ratio_arr(bc - be, bm - be)
        return point, {k: (_ci(boot[:, j]) if point[k] == point[k] else [float("nan"), float("nan")])
                       for j, k in enumerate(keys)}

    def faithfulness(self, keep_sites: Iterable[Site | str], metric: str = "logit_diff") -> dict[str, float]:
        """Normalised faithfulness (no CI) of a circuit, per target and "all"."""
        return self.normalized(self.score(keep_sites), metric, ci=False)[0]

    def single_effect(self, site: Site | str) -> float:
        """F(M) − F(M∖{v}): the pooled mean-LD drop when only what ``site`` covers is ablated in the
        full model (a residual site: its whole bundle)."""
        without = self.score([site], complement=True)
        return self.means(self.full.logit_diff)["all"] - self.means(without.logit_diff)["all"]


@dataclass
class CircuitEvaluation(JsonResult):
    sites: list[str]
    components: list[str]  # the component nodes (heads / MLPs named in the circuit)
    residual_sites: list[str]  # the residual nodes: bundles, see ``bundles``
    never_ablated_sites: list[str]
    target_names: list[str]
    n: int
    n_skipped: int
    n_pairs: dict[str, int]
    competitors: dict[str, int]
    means: dict[str, dict[str, dict[str, float]]]  # metric -> condition -> target -> mean
    normalized: dict[str, dict[str, float]]  # metric -> target -> normalised faithfulness
    normalized_ci: dict[str, dict[str, list[float]]]
    faithfulness_normalized: dict[str, float]  # = normalized["logit_diff"] (the primary number)
    faithfulness_normalized_ci: dict[str, list[float]]
    faithfulness: dict[str, float]  # legacy: acc(C) / acc(M)
    full: dict[str, float]  # legacy: accuracy of M, ∅, C, M∖C
    empty: dict[str, float]
    circuit: dict[str, float]
    complement: dict[str, float]
    completeness: dict[str, float]  # target -> 1 − max_K incompleteness(K)
    incompleteness: dict[str, Any]  # subsets, mean, max
    minimality: dict[str, dict[str, float]]  # node -> target -> normalised drop
    minimality_ci: dict[str, dict[str, list[float]]]
    minimal: bool
    min_contribution: float
    seed: int
    n_boot: int
    bundles: dict[str, list[str]] = field(default_factory=dict)  # residual node -> the components it covers
    definitions: str = field(default=DEFINITIONS)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def completeness_subsets(nodes: Sequence[Site], n_random: int = 20, seed: int = 0) -> list[list[Site]]:
    """K = ∅, every node, each single node, and ``n_random`` random subsets (seeded, deduplicated)."""
    rng = random.Random(70_000 + seed)
    out: list[list[Site]] = []
    seen: set[frozenset] = set()

    def add(k: list[Site]) -> None:
        key = frozenset(map(str, k))
        if key not in seen:
            seen.add(key)
            out.append(k)

    for k in [[], list(nodes)] + [[v] for v in nodes]:
        add(k)
    base = len(out)
    for _ in range(n_random * 5):
        if len(out) >= base + n_random or len(nodes) < 3:
            break  # with < 3 nodes every subset is already listed
        idx = sorted(rng.sample(range(len(nodes)), rng.randint(2, len(nodes) - 1)))
        add([nodes[i] for i in idx])
    return out


def evaluate_circuit(pm: ProbedModel, sites: Sequence[Site | str], inputs: Sequence[str] | None = None,
                     n: int = 1000, seed: int = 0, min_contribution: float = 0.01, n_subsets: int = 20,
                     evaluator: AblationEvaluator | None = None, batch_size: int = 256,
                     n_boot: int = 1000) -> CircuitEvaluation:
    """Aligned resample-ablation evaluation of the circuit made of ``sites`` (see the module doc).

    Pass ``evaluator`` to reuse its caches (its inputs / seed then apply, not ``inputs`` / ``n``)."""
    ev = evaluator or AblationEvaluator(pm, inputs, n=n, seed=seed, batch_size=batch_size, n_boot=n_boot)
    nodes = as_sites(sites)
    for s in nodes:
        check_site(s, ev.L, ev.H)
    comps = [s for s in nodes if site_role(s) == "component"]
    resid = [s for s in nodes if site_role(s) == "residual"]
    never = [s for s in nodes if site_role(s) == "never_ablated"]
    ablatable = [s for s in nodes if site_role(s) != "never_ablated"]  # component and residual nodes, in order
    keys = ev.target_names + ["all"]
    C, Mc = ev.score(nodes), ev.score(ablatable, complement=True)
    conds = {"full": ev.full, "empty": ev.empty, "circuit": C, "complement": Mc}
    means = {m: {c: ev.means(s.metric(m)) for c, s in conds.items()} for m in METRICS}
    normalized, normalized_ci = {}, {}
    for m in METRICS:
        normalized[m], normalized_ci[m] = ev.normalized(C, m)
    acc = means["accuracy"]
    legacy = {k: _ratio(acc["circuit"][k], acc["full"][k]) for k in keys}

    F = lambda s: ev.means(s.logit_diff)  # noqa: E731
    FM, FE, FC = F(ev.full), F(ev.empty), F(C)
    denom = {k: FM[k] - FE[k] for k in keys}
    subsets = []
    for K in completeness_subsets(ablatable, n_subsets, seed):
        a, b = F(ev.score_removed(nodes, K)), F(ev.score_removed(nodes, K, complement=True))
        subsets.append({"K": [str(s) for s in K],
                        "values": {k: _ratio(abs(a[k] - b[k]), abs(denom[k])) for k in keys}})
    inc_mean = {k: float(np.nanmean([s["values"][k] for s in subsets])) if subsets else float("nan") for k in keys}
    inc_max = {k: float(np.nanmax([s["values"][k] for s in subsets])) if subsets else float("nan") for k in keys}
    completeness = {k: 1.0 - inc_max[k] for k in keys}

    minimality, minimality_ci = {}, {}
    bM, bE, bC = ev.boot_means(ev.full.logit_diff), ev.boot_means(ev.empty.logit_diff), ev.boot_means(C.logit_diff)
    for v in ablatable:
        without = ev.score_removed(nodes, [v])
        Fw = F(without)
        minimality[str(v)] = {k: _ratio(FC[k] - Fw[k], denom[k]) for k in keys}
        boot = _ratio_arr(bC - ev.boot_means(without.logit_diff), bM - bE)
        minimality_ci[str(v)] = {k: _ci(boot[:, j]) for j, k in enumerate(keys)}
    minimal = bool(minimality) and all((m["all"] == m["all"]) and m["all"] > min_contribution
                                       for m in minimality.values())
    n_pairs = {k: int(ev._counts[:, j].sum()) for j, k in enumerate(keys)}
    return CircuitEvaluation(
        sites=[str(s) for s in nodes], components=[str(s) for s in comps], residual_sites=[str(s) for s in resid],
        never_ablated_sites=[str(s) for s in never], target_names=list(ev.target_names), n=ev.n,
        n_skipped=ev.n_skipped, n_pairs=n_pairs, competitors=dict(ev.competitors), means=means,
        normalized=normalized, normalized_ci=normalized_ci, faithfulness_normalized=normalized["logit_diff"],
        faithfulness_normalized_ci=normalized_ci["logit_diff"], faithfulness=legacy, full=acc["full"],
        empty=acc["empty"], circuit=acc["circuit"], complement=acc["complement"], completeness=completeness,
        incompleteness={"subsets": subsets, "mean": inc_mean, "max": inc_max}, minimality=minimality,
        minimality_ci=minimality_ci, minimal=minimal, min_contribution=min_contribution, seed=ev.seed,
        n_boot=ev.n_boot, bundles={str(v): [str(c) for c in bundle_components(v, ev.H)] for v in resid})


__all__ = ["AblationEvaluator", "CircuitEvaluation", "Mask", "Scores", "as_sites", "bundle_components",
           "completeness_subsets", "covered_components", "evaluate_circuit", "is_component", "site_role",
           "DEFINITIONS", "METRICS"]
