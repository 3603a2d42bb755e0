"""Hypothesis generation: which features does each site@position carry, judged by its ε-preimages?

For a site s@p and a feature f, over many queries x:

    agreement_x = share of preimage members x' with f(x', p') = f(x, p)     (p' = matched position)
    baseline_x  = the same share over baseline inputs (outside ε, or random inputs)

``agreement`` and ``baseline`` are the means over queries (each query weighs the same, however
large its preimage); ``lift = agreement / baseline``.  The p-value is a one-sided sign test over
queries (is agreement_x > baseline_x more often than not?), and Benjamini–Hochberg controls the
false discovery rate over every (site, feature) pair tested in the run.

Features that are identical partitions of the inputs (e.g. ``F1`` and ``tok@1`` in addition) are
tested once, under the most specific name (task feature > absolute generic > positional), with
the others listed as aliases.  Features constant on the task's inputs and generic features that
read tokens after the site's position (a causal model cannot carry them) are not tested.
"""
from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from circuitkit import shards
from circuitkit.errors import CircuitkitError
from circuitkit.hypotheses.features import (
    AnyFeature,
    PositionalFeature,
    all_features,
    evaluate,
    kind_rank,
    reads_beyond,
)
from circuitkit.hypotheses.preimage_sources import PreimageSource, QueryPreimage
from circuitkit.hypotheses.records import Example, Hypothesis, HypothesisReport, Thresholds
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site
from circuitkit.tasks.base import Task
from circuitkit.tasks.registry import task_record


class FeatureEncoder:
    """Integer codes of features on (text, position) items, cached; codes shared across items."""

    def __init__(self, task: Task, features: Mapping[str, AnyFeature]) -> None:
        self.task = task
        self.names = list(features)
        self.features = features
        self.positional = np.array([isinstance(features[n], PositionalFeature) for n in self.names])
        self.books: list[dict[Hashable, int]] = [{} for _ in self.names]
        self._plain: dict[str, np.ndarray] = {}
        self._pos: dict[tuple[str, int], np.ndarray] = {}
        self._tokens: dict[str, list[str] | None] = {}

    def tokens(self, text: str) -> list[str] | None:
        """``Task.try_tokens``, cached per text."""
        if text not in self._tokens:
            self._tokens[text] = self.task.try_tokens(text)
        return self._tokens[text]

    def _code(self, fi: int, v: Hashable | None) -> int:
        if v is None:
            return -1
        book = self.books[fi]
        try:
            c = book.get(v)
        except TypeError:
            return -1
        if c is None:
            c = book[v] = len(book)
        return c

    def _eval(self, text: str, pos: int | None, which: np.ndarray) -> np.ndarray:
        toks = self.tokens(text)
        out = np.full(len(self.names), -1, dtype=np.int32)
        if toks is None:
            return out
        for fi in np.nonzero(which)[0]:
            out[fi] = self._code(fi, evaluate(self.features[self.names[fi]], toks, pos))
        return out

    def codes(self, items: Sequence[tuple[str, int]]) -> np.ndarray:
        """[n_features, n_items] codes (−1 = undefined)."""
        cols = []
        for text, pos in items:
            plain = self._plain.get(text)
            if plain is None:
                plain = self._plain[text] = self._eval(text, None, ~self.positional)
            if self.positional.any():
                key = (text, pos)
                pcodes = self._pos.get(key)
                if pcodes is None:
                    pcodes = self._pos[key] = self._eval(text, pos, self.positional)
                plain = np.where(self.positional, pcodes, plain)
            cols.append(plain)
        if not cols:
            return np.zeros((len(self.names), 0), dtype=np.int32)
        return np.stack(cols, axis=1)

    def value(self, fi: int, code: int) -> Hashable | None:
        if code < 0:
            return None
        for v, c in self.books[fi].items():
            if c == code:
                return v
        return None


def _partition_key(row: np.ndarray) -> tuple:
    """Relabel codes by first appearance, so two features inducing the same partition match."""
    seen: dict[int, int] = {}
    return tuple(seen.setdefault(int(c), len(seen)) if c >= 0 else -1 for c in row)


def alias_groups(codes: np.ndarray, names: Sequence[str], task_names: Sequence[str]) -> dict[str, list[str]]:
    """{canonical name: [aliases]} over features that are not constant on the items."""
    groups: dict[tuple, list[int]] = {}
    for fi in range(codes.shape[0]):
        row = codes[fi]
        defined = row[row >= 0]
        if defined.size == 0 or np.unique(defined).size < 2:
            continue  # constant or undefined: carries no information
        groups.setdefault(_partition_key(row), []).append(fi)
    out = {}
    for members in groups.values():
        members.sort(key=lambda fi: (kind_rank(names[fi], task_names), fi))
        out[names[members[0]]] = [names[fi] for fi in members[1:]]
    return out


def _sign_test(diffs: np.ndarray) -> float:
    pos, neg = int((diffs > 0).sum()), int((diffs < 0).sum())
    if pos + neg == 0:
        return 1.0
    return float(sps.binomtest(pos, pos + neg, 0.5, alternative="greater").pvalue)


def score_site(encoder: FeatureEncoder, site: Site, qps: Sequence[QueryPreimage], feature_idx: Sequence[int]) -> list[dict]:
    """Raw statistics for each feature index at one site (no FDR yet)."""
    F = len(feature_idx)
    fidx = np.asarray(feature_idx, dtype=int)
    per_q_m, per_q_b, valid = [], [], []
    n_m_tot, n_b_tot = np.zeros(F, int), np.zeros(F, int)
    for qp in qps:
        qc = encoder.codes([(qp.query, qp.position)])[fidx, 0]  # [F]
        mc = encoder.codes([(s.text, s.position) for s in qp.members])[fidx]  # [F, m]
        bc = encoder.codes([(s.text, s.position) for s in qp.baseline])[fidx]  # [F, b]
        m_def, b_def = mc >= 0, bc >= 0
        n_m, n_b = m_def.sum(1), b_def.sum(1)
        a_m = ((mc == qc[:, None]) & m_def).sum(1) / np.maximum(n_m, 1)
        a_b = ((bc == qc[:, None]) & b_def).sum(1) / np.maximum(n_b, 1)
        ok = (qc >= 0) & (n_m > 0) & (n_b > 0)
        per_q_m.append(a_m)
        per_q_b.append(a_b)
        valid.append(ok)
        n_m_tot += np.where(ok, n_m, 0)
        n_b_tot += np.where(ok, n_b, 0)
    if not qps:
        return []
    A_m, A_b, V = np.stack(per_q_m, 1), np.stack(per_q_b, 1), np.stack(valid, 1)  # [F, Q]
    rows = []
    for j in range(F):
        v = V[j]
        nq = int(v.sum())
        if nq == 0:
            rows.append({"fi": int(fidx[j]), "agreement": 0.0, "baseline": 0.0, "lift": 0.0, "kappa": 0.0, "p": 1.0,
                         "nq": 0,
                         "n_m": 0, "n_b": 0})
            continue
        agree, base = float(A_m[j, v].mean()), float(A_b[j, v].mean())
        n_b = int(n_b_tot[j])
        lift = agree / max(base, 1.0 / (n_b / nq + 1))  # floor: one baseline sample per query, no infinite lifts
        kappa = (agree - base) / (1.0 - base) if base < 1.0 else 0.0
        rows.append({"fi": int(fidx[j]), "agreement": agree, "baseline": base, "lift": lift, "kappa": kappa,
                     "p": _sign_test(A_m[j, v] - A_b[j, v]), "nq": nq, "n_m": int(n_m_tot[j]), "n_b": n_b})
    return rows


def _examples(encoder: FeatureEncoder, fi: int, qps: Sequence[QueryPreimage], n: int) -> tuple[Example, ...]:
    out: list[Example] = []
    for qp in qps:
        if not qp.members:
            continue
        qv = encoder.value(fi, int(encoder.codes([(qp.query, qp.position)])[fi, 0]))
        for s in sorted(qp.members, key=lambda s: s.distance)[: max(1, n // 2)]:
            v = encoder.value(fi, int(encoder.codes([(s.text, s.position)])[fi, 0]))
            out.append(Example(qp.query, s.text, s.position, round(s.distance, 4), _jsonable(v), _jsonable(qv)))
            if len(out) >= n:
                return tuple(out)
    return tuple(out)


def _jsonable(v):
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


#: one site's scoring: (preimage coverage, feature codes, candidate groups, scored rows, the preimages)
_SiteScores = tuple[float, np.ndarray, dict[str, list[str]], list[dict], list[QueryPreimage]]


def generate_hypotheses(
    model: ProbedModel,
    sites: Sequence[Site],
    queries: Sequence[str],
    source: PreimageSource,
    features: Mapping[str, AnyFeature] | None = None,
    thresholds: Thresholds | None = None,
    n_examples: int = 4,
    keep_rejected: int = 5,
    alias_inputs: int = 500,
    seed: int = 0,
    model_name: str = "",
) -> HypothesisReport:
    """Score every (site@position, feature) pair, apply FDR, and rank per site.

    sites: each with a position.  queries: input texts whose activations are inverted.
    keep_rejected: how many non-accepted hypotheses per site to keep in the report (best first).
    """
    task = model.task
    thresholds = thresholds or Thresholds()
    if not queries:
        raise CircuitkitError("no queries given")
    for s in sites:
        if s.position is None:
            raise CircuitkitError(f"site {s} needs a position, e.g. {s.node}@{task.position_names[-1]}")
    feats = dict(features) if features is not None else all_features(task)
    task_names = [f.name for f in task.task_features()]
    encoder = FeatureEncoder(task, feats)
    extra = task.generate(random.Random(20_000 + seed), alias_inputs)

    def one_site(site: Site) -> _SiteScores | None:
        site_queries = [q for q in queries if _has_position(task, encoder, q, site.position)]
        if not site_queries:
            return None  # e.g. A4 of a sum with a 3-digit answer: no query has this position
        qps = source.preimages(site, site_queries)
        codes, groups = _candidate_features(task, encoder, site, qps, extra, task_names, model.runner.arch.causal)
        rows = score_site(encoder, site, qps, [encoder.names.index(n) for n in groups])
        return float(np.mean([len(q.members) > 0 for q in qps])) if qps else 0.0, codes, groups, rows, qps

    raw: list[tuple[Site, dict, list[str], list[QueryPreimage]]] = []
    site_codes: dict[str, np.ndarray] = {}
    coverage: dict[str, float] = {}
    # sites are independent (each preimage is seeded by its query): under torch.distributed each runs on one rank
    for site, got in zip(sites, shards.map_units(one_site, list(sites)), strict=True):
        if got is None:
            coverage[str(site)] = 0.0
            continue
        coverage[str(site)], site_codes[str(site)], groups, rows, qps = got
        raw += [(site, row, groups[encoder.names[row["fi"]]], qps) for row in rows]
    if not raw:
        return HypothesisReport(task.name, model_name, getattr(source, "name", "?"), source.eps, thresholds, [],
                                coverage, 0, task_ref=task_record(task))
    hyps_by_site = _fdr_hypotheses(raw, thresholds, encoder, n_examples)
    out = _ranked(sites, hyps_by_site, site_codes, encoder, keep_rejected)
    settings = {"n_queries": len(queries), "sites": [str(s) for s in sites], "n_features": len(feats),
                "seed": seed, "sign_test": "one-sided binomial sign test over queries",
                "fdr_method": "Benjamini-Hochberg (scipy.stats.false_discovery_control)"}
    return HypothesisReport(task.name, model_name, getattr(source, "name", "?"), source.eps, thresholds, out,
                            coverage, len(raw), settings, task_record(task))


def _candidate_features(task: Task, encoder: FeatureEncoder, site: Site, qps: Sequence[QueryPreimage],
                        extra: Sequence[str], task_names: list[str], causal: bool = True
                        ) -> tuple[np.ndarray, dict[str, list[str]]]:
    """(codes on the queries and alias inputs, {candidate: aliases}): the features not reading past the site's
    (latest) position (a causal model's site cannot see later tokens; a bidirectional one's sees them all),
    informative and de-aliased, that are worth scoring at the site."""
    max_pos = max(q.position for q in qps) if causal else task.seq_len
    alias_items = [(q.query, q.position) for q in qps]
    for t in extra:
        toks = encoder.tokens(t)
        if toks is not None:
            try:
                alias_items.append((t, task.resolve_position(site.position, toks)))
            except CircuitkitError:
                pass
    codes = encoder.codes(alias_items)
    keep = [fi for fi, n in enumerate(encoder.names) if not reads_beyond(n, max_pos)]
    groups = alias_groups(codes[keep], [encoder.names[k] for k in keep], task_names)
    return codes, groups


def _fdr_hypotheses(raw: list[tuple[Site, dict, list[str], list[QueryPreimage]]], thresholds: Thresholds,
                    encoder: FeatureEncoder, n_examples: int) -> dict[str, list[Hypothesis]]:
    """{site: hypotheses}: every scored row with its BH q-value and acceptance (examples only for accepted ones)."""
    pvals = np.array([r["p"] for _, r, _, _ in raw])
    qvals = sps.false_discovery_control(pvals, method="bh")
    hyps_by_site: dict[str, list[Hypothesis]] = {}
    for (site, r, aliases, qps), q in zip(raw, qvals, strict=False):
        accepted = bool(q <= thresholds.fdr and r["kappa"] >= thresholds.min_kappa
                        and r["lift"] >= thresholds.min_lift and r["nq"] >= thresholds.min_queries)
        h = Hypothesis(str(site), encoder.names[r["fi"]], round(r["agreement"], 4), round(r["baseline"], 4),
                       round(r["lift"], 3), round(r["kappa"], 4), float(r["p"]), float(q), r["nq"], r["n_m"], r["n_b"],
                       accepted, aliases=tuple(aliases),
                       examples=_examples(encoder, r["fi"], qps, n_examples) if accepted else ())
        hyps_by_site.setdefault(str(site), []).append(h)
    return hyps_by_site


def _ranked(sites: Sequence[Site], hyps_by_site: dict[str, list[Hypothesis]], site_codes: dict[str, np.ndarray],
            encoder: FeatureEncoder, keep_rejected: int) -> list[Hypothesis]:
    """Per site in order, the accepted hypotheses then the best ``keep_rejected`` others, ranked from 1."""
    out: list[Hypothesis] = []
    for site in sites:
        hs = hyps_by_site.get(str(site), [])
        hs.sort(key=lambda h: (not h.accepted, -h.kappa, h.p_value, h.feature))
        hs = _prune_implied(hs, site_codes.get(str(site)), encoder)
        hs.sort(key=lambda h: (not h.accepted, -h.kappa, h.p_value, h.feature))
        acc = [h for h in hs if h.accepted]
        rej = [h for h in hs if not h.accepted][:keep_rejected]
        for i, h in enumerate(acc + rej):
            out.append(_with_rank(h, i + 1))
    return out


def _has_position(task: Task, encoder: FeatureEncoder, text: str, position: str | int) -> bool:
    toks = encoder.tokens(text)
    if toks is None:
        return False
    try:
        task.resolve_position(position, toks)
        return True
    except CircuitkitError:
        return False


def is_function_of(f_row: np.ndarray, g_row: np.ndarray) -> bool:
    """Whether f's value is determined by g's on these items (every defined g-code maps to one f-code)."""
    seen: dict[int, int] = {}
    for g, f in zip(g_row.tolist(), f_row.tolist(), strict=False):
        if g < 0:
            continue
        if seen.setdefault(g, f) != f:
            return False
    return True


def _prune_implied(hs: list[Hypothesis], codes: np.ndarray | None, encoder: FeatureEncoder) -> list[Hypothesis]:
    """Un-accept features that are functions of an accepted feature with at least their kappa (e.g.
    ``count(a)`` up to position 1 is a function of ``tok@1``): the finer feature explains the preimage."""
    from dataclasses import replace

    if codes is None:
        return hs
    kept: list[Hypothesis] = []
    out = []
    n_values = {h.feature: np.unique(codes[encoder.names.index(h.feature)]).size for h in hs}
    hs = sorted(hs, key=lambda h: (not h.accepted, -h.kappa, -n_values[h.feature], h.feature))
    for h in hs:  # accepted first; best kappa first, finer partitions first among equals
        if h.accepted:
            fi = encoder.names.index(h.feature)
            by = next((g for g in kept if g.kappa >= h.kappa - 1e-9
                       and is_function_of(codes[fi], codes[encoder.names.index(g.feature)])), None)
            if by is not None:
                h = replace(h, accepted=False, implied_by=by.feature, examples=())
            else:
                kept.append(h)
        out.append(h)
    return out


def _with_rank(h: Hypothesis, rank: int) -> Hypothesis:
    from dataclasses import replace

    return replace(h, rank=rank)


def format_report(rep: HypothesisReport, top: int = 5) -> str:
    """Human-readable ranked list per site."""
    lines = [f"{rep.task}: {rep.n_tested} hypotheses tested, {len(rep.accepted())} accepted "
             f"(preimages: {rep.source}, eps={rep.eps})", rep.thresholds.describe()]
    for site, hs in rep.by_site().items():
        cov = rep.coverage.get(site)
        lines.append(f"\n{site}  (queries with preimage members: {cov:.0%})" if cov is not None else f"\n{site}")
        for h in hs[:top]:
            mark = "ACCEPT" if h.accepted else "      "
            al = f"  (= {', '.join(h.aliases[:3])})" if h.aliases else ""
            al += f"  [implied by {h.implied_by}]" if h.implied_by else ""
            lines.append(f"  {h.rank:>2}. {mark} {h.feature:<14} kappa {h.kappa:5.2f}  agree {h.agreement:.2f} vs "
                         f"{h.baseline:.2f}  lift {h.lift:5.2f}  q {h.q_value:.1e}  n_q {h.n_queries}{al}")
    return "\n".join(lines)


__all__ = ["FeatureEncoder", "alias_groups", "score_site", "generate_hypotheses", "format_report"]
