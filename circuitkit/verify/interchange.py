"""Verify "site S@p carries feature f" by interchange interventions.

For a hypothesis we patch S@p from a **source** input into a **base** input (patching engine,
``circuitkit.patching``) and compare the base's predictions at every answer read at or after p:

* necessity — pairs whose f differs: the prediction should change far more often than for pairs
  whose f agrees (effect = change rate(f differs) − change rate(f agrees), bootstrap CI).  When f
  determines an answer on the task's inputs (answer = g(f) with purity ≥ 0.99) we also demand that
  the output moves *the way f predicts*: interchange-intervention accuracy IIA = share of
  f-differing pairs whose patched prediction equals g(f(source)).
* sufficiency — pairs whose f agrees but which differ elsewhere: the prediction should stay put
  (change rate CI high ≤ threshold).

A site whose best single feature is necessary but not sufficient is tested with a growing set of
its necessary features (sources agreeing on all of them), so a node may carry several features.
A *site group* (``"a1.0@END & a1.2@END"``: sites at one position, patched together) tests a
feature that several components carry redundantly, where patching any one of them alone moves
nothing (backup heads).
"""
from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.hypotheses.features import AnyFeature, all_features
from circuitkit.hypotheses.records import Hypothesis
from circuitkit.hypotheses.scoring import FeatureEncoder
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site, check_site, parse_site
from circuitkit.verify.stats import Estimate, diff_estimate, estimate


@dataclass(frozen=True)
class VerifyThresholds:
    """Verdict rules, stated in every output."""

    min_effect: float = 0.1  # necessity: CI low of change(f differs) − change(f agrees) ≥ this
    min_iia: float = 0.5  # necessity, answer-determining f: CI low of IIA ≥ this
    max_change_agree: float = 0.15  # sufficiency: CI high of change(f agrees) ≤ this
    determining_purity: float = 0.99  # f "determines" an answer when answer = g(f) on this share of inputs
    min_pairs: int = 30  # fewer pairs than this on either side: no verdict (counts as not verified)
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"necessary on an answer when the {self.confidence:.0%} CI low of [change rate when f differs − change "
                f"rate when f agrees] >= {self.min_effect} (and, when f determines that answer, the CI low of IIA >= "
                f"{self.min_iia}); sufficient when the CI high of the change rate when f agrees <= "
                f"{self.max_change_agree}; verified when both hold on some answer; >= {self.min_pairs} pairs per side")


@dataclass
class TargetResult:
    """Interchange statistics for one answer (target) of the task."""

    target: str
    n_differ: int
    n_agree: int
    change_differ: Estimate | None
    change_agree: Estimate | None
    effect: Estimate | None
    iia: Estimate | None
    determining: bool
    necessary: bool
    sufficient: bool

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items()}
        return d


@dataclass
class Verdict:
    """Verification of one (site, feature set) under one condition (real or a null control)."""

    site: str
    features: tuple[str, ...]
    condition: str  # "real", "random_model", "shuffled_feature"
    targets: list[TargetResult]
    verified: bool
    necessary_targets: list[str]
    verified_targets: list[str]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "features": list(self.features), "condition": self.condition,
                "verified": self.verified, "necessary_targets": self.necessary_targets,
                "verified_targets": self.verified_targets, "note": self.note,
                "targets": [t.to_dict() for t in self.targets]}


# ---- the patching call (the one place this module touches the patching engine) ----------------------
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


@torch.no_grad()
def interchange_logits(pm: ProbedModel, base_ids: Tensor, source_ids: Tensor, site: Site | Sequence[Site]) -> Tensor:
    """Logits [b, pos, vocab] of the base inputs with ``site`` — or every site of a group at once — (at its
    named position, resolved per input in base and source separately) replaced by the source's activation."""
    sites = group_sites(site)
    try:
        from circuitkit.patching.ablations import build_patches
        from circuitkit.patching.node import run_with_patches
    except ImportError:  # pragma: no cover - interim path while the patching package is absent
        if len(sites) != 1:
            raise
        return _interchange_logits_local(pm, base_ids, source_ids, sites[0])
    patches = build_patches(pm, base_ids, sites, "interchange", source_ids=source_ids)
    return run_with_patches(pm.runner, base_ids.to(pm.device), patches)


def _interchange_logits_local(pm: ProbedModel, base_ids: Tensor, source_ids: Tensor, site: Site) -> Tensor:
    from circuitkit.activations import resolve_positions

    bpos = resolve_positions(pm.task, base_ids, site.position)
    spos = resolve_positions(pm.task, source_ids, site.position)
    _, cache = pm.runner.run(source_ids.to(pm.device), cache=[site.hook_name], return_logits=False)
    value = site.select(cache[site.hook_name], spos)

    def hook(act: Tensor) -> Tensor:
        act = act.clone()
        rows = torch.arange(act.shape[0])
        if site.head is not None:
            act[rows, bpos, site.head] = value
        else:
            act[rows, bpos] = value
        return act

    return pm.runner.run(base_ids.to(pm.device), hooks={site.hook_name: hook})[0]


# ---- the verifier -----------------------------------------------------------------------------------
class InterchangeVerifier:
    """Holds a set of task inputs, their clean predictions, feature codes, and runs the tests.

    ``inputs``: task texts used as bases and sources (default ``n_inputs`` fresh ones).
    """

    def __init__(self, pm: ProbedModel, inputs: Sequence[str] | None = None, n_inputs: int = 3000,
                 n_pairs: int = 200, thresholds: VerifyThresholds | None = None,
                 features: Mapping[str, AnyFeature] | None = None, seed: int = 0,
                 encoder: FeatureEncoder | None = None) -> None:
        self.pm = pm
        self.task = pm.task
        self.th = thresholds or VerifyThresholds()
        self.n_pairs = n_pairs
        self.seed = seed
        if inputs is None:
            inputs = self.task.generate(random.Random(30_000 + seed), n_inputs)
        self.inputs = list(dict.fromkeys(inputs))
        self.ids = self.task.encode(self.inputs)
        self.tokens = [self.task.tokens(t) for t in self.inputs]
        self.features = dict(features) if features is not None else all_features(self.task)
        self.encoder = encoder or FeatureEncoder(self.task, self.features)
        self.targets = [self.task.targets(t) for t in self.tokens]
        self.target_names = list(dict.fromkeys(t.name for ts in self.targets for t in ts))
        with torch.no_grad():
            logits = pm.runner.logits(self.ids.to(pm.device))
        self.clean_pred = logits.argmax(-1).cpu()  # [N, pos]
        self._pos: dict[Any, np.ndarray] = {}
        self._codes: dict[tuple, np.ndarray] = {}

    def with_model(self, pm: ProbedModel) -> "InterchangeVerifier":
        """The same inputs, features and thresholds on another model (the random-init null control)."""
        return InterchangeVerifier(pm, self.inputs, n_pairs=self.n_pairs, thresholds=self.th,
                                   features=self.features, seed=self.seed, encoder=self.encoder)

    # ---- data ----
    def positions(self, site: Site) -> np.ndarray:
        if site.position not in self._pos:
            self._pos[site.position] = np.array([self.task.resolve_position(site.position, t) for t in self.tokens])
        return self._pos[site.position]

    def codes(self, site: Site, feature: str) -> np.ndarray:
        """[N] codes of ``feature`` on every input, evaluated at the site's position."""
        key = (site.position, feature)
        if key not in self._codes:
            if feature not in self.features:
                raise CircuitkitError(f"unknown feature {feature!r} for task {self.task.name}")
            fi = self.encoder.names.index(feature)
            pos = self.positions(site)
            self._codes[key] = self.encoder.codes(list(zip(self.inputs, pos.tolist())))[fi]
        return self._codes[key]

    def _pairs(self, codes: np.ndarray, agree: bool, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """(base, source) index arrays; ``codes`` [k, N]: agree on all k, or differ on the first."""
        defined = (codes >= 0).all(0)
        idx = np.nonzero(defined)[0].tolist()
        if not idx:
            return np.zeros(0, int), np.zeros(0, int)
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(tuple(codes[:, i]), []).append(i)
        bases, srcs = [], []
        order = idx[:]
        rng.shuffle(order)
        for i in order:
            if len(bases) >= self.n_pairs:
                break
            if agree:
                g = groups[tuple(codes[:, i])]
                if len(g) < 2:
                    continue
                j = i
                while j == i:
                    j = g[rng.randrange(len(g))]
            else:
                for _ in range(50):
                    j = idx[rng.randrange(len(idx))]
                    if codes[0, j] != codes[0, i]:
                        break
                else:
                    continue
            bases.append(i)
            srcs.append(j)
        return np.array(bases, int), np.array(srcs, int)

    def _patched_pred(self, site: Site | Sequence[Site], base: np.ndarray, src: np.ndarray) -> Tensor:
        if base.size == 0:
            return torch.zeros(0, self.ids.shape[1], dtype=torch.long)
        logits = interchange_logits(self.pm, self.ids[base], self.ids[src], site)
        return logits.argmax(-1).cpu()

    def _changes(self, site: Site, base: np.ndarray, pred: Tensor) -> dict[str, np.ndarray]:
        """{target: [n] 1.0 where the prediction at that answer changed}, answers at/after the site."""
        spos = self.positions(site)
        out: dict[str, list[float]] = {}
        for r, i in enumerate(base.tolist()):
            for t in self.targets[i]:
                if t.position >= spos[i]:
                    out.setdefault(t.name, []).append(float(pred[r, t.position] != self.clean_pred[i, t.position]))
        return {k: np.array(v) for k, v in out.items()}

    def _determining(self, site: Site, feature: str) -> dict[str, dict]:
        """{target: {code: answer token}} for answers that the feature determines on the inputs."""
        c = self.codes(site, feature)
        out = {}
        for name in self.target_names:
            pairs = [(int(c[i]), t.token) for i in range(len(self.inputs)) if c[i] >= 0
                     for t in self.targets[i] if t.name == name]
            if not pairs:
                continue
            by: dict[int, Counter] = {}
            for code, tok in pairs:
                by.setdefault(code, Counter())[tok] += 1
            purity = sum(cnt.most_common(1)[0][1] for cnt in by.values()) / len(pairs)
            if purity >= self.th.determining_purity and len(by) > 1:
                out[name] = {code: cnt.most_common(1)[0][0] for code, cnt in by.items()}
        return out

    # ---- tests ----
    def test(self, site: Site | str | Sequence[Site], features: Sequence[str], condition: str = "real",
             shuffle: bool = False) -> Verdict:
        """Necessity (first feature) and sufficiency (all features agree) of ``site`` carrying ``features``;
        a site group (``"a1.0@END & a1.2@END"`` or a list) is patched as one."""
        sites = group_sites(site)
        for x in sites:
            check_site(x, self.pm.n_layers, self.pm.n_heads)
        site = sites[0]  # features and answers are read at the group's one position
        if site.position is None:
            raise CircuitkitError(f"site {site} needs a position")
        label = group_name(sites)
        rng = random.Random(zlib.crc32(f"{label}|{'|'.join(features)}|{self.seed}".encode()))
        codes = np.stack([self.codes(site, f) for f in features])  # [k, N]
        if shuffle:
            prng = np.random.default_rng(self.seed + 1)
            codes = np.stack([row[prng.permutation(row.size)] for row in codes])
        db, ds = self._pairs(codes[:1], agree=False, rng=rng)
        ab, as_ = self._pairs(codes, agree=True, rng=rng)
        pred_d = self._patched_pred(sites, db, ds)
        pred_a = self._patched_pred(sites, ab, as_)
        ch_d, ch_a = self._changes(site, db, pred_d), self._changes(site, ab, pred_a)
        determining = self._determining(site, features[0]) if len(features) == 1 else {}
        th = self.th
        results = []
        for name in self.target_names:
            xd, xa = ch_d.get(name, np.zeros(0)), ch_a.get(name, np.zeros(0))
            if xd.size == 0 and xa.size == 0:
                continue  # answer read before the site: it cannot affect it
            enough = xd.size >= th.min_pairs and xa.size >= th.min_pairs
            e_d = estimate(xd, th.confidence) if xd.size else None
            e_a = estimate(xa, th.confidence) if xa.size else None
            eff = diff_estimate(xd, xa, th.confidence) if xd.size and xa.size else None
            iia = None
            if name in determining and xd.size:
                g = determining[name]
                spos = self.positions(site)
                hits = []
                for r, (i, j) in enumerate(zip(db.tolist(), ds.tolist())):
                    for t in self.targets[i]:
                        if t.name == name and t.position >= spos[i]:
                            want = g.get(int(codes[0, j]))
                            hits.append(float(want is not None and int(pred_d[r, t.position]) == want))
                iia = estimate(np.array(hits), th.confidence) if hits else None
            necessary = bool(enough and eff is not None and eff.ci_low >= th.min_effect
                             and (name not in determining or (iia is not None and iia.ci_low >= th.min_iia)))
            sufficient = bool(enough and e_a is not None and e_a.ci_high <= th.max_change_agree)
            results.append(TargetResult(name, int(xd.size), int(xa.size), e_d, e_a, eff, iia, name in determining,
                                        necessary, sufficient))
        nec = [r.target for r in results if r.necessary]
        ver = [r.target for r in results if r.necessary and r.sufficient]
        note = "" if results else "no answer is read at or after this position"
        if results and all(r.n_agree < th.min_pairs for r in results):
            note = f"fewer than {th.min_pairs} sources agree on {', '.join(features)}: sufficiency untestable"
        return Verdict(label, tuple(features), condition, results, bool(ver), nec, ver, note)


__all__ = ["VerifyThresholds", "TargetResult", "Verdict", "InterchangeVerifier", "interchange_logits", "group_sites",
           "group_name", "GROUP_SEP"]
