"""Verify "site S@p carries feature f" by interchange interventions on *fair* (stratified) pairs.

For a hypothesis we patch S@p from a **source** input into a **base** input (patching engine,
``circuitkit.patching``) and read the base's predictions at every answer read at or after p.
Sources are drawn per base by ``Task.fair_sources``: they hold fixed what ``Task.holds_fixed``
names for f (the layout, and e.g. the query letter for ``count(query)``; IOI's base's own two
names for ``IO``), so a test asks about f and nothing else.  Per base we draw one source whose f
differs and one whose f agrees.

Per answer (target) that f is *relevant* to — the task's answer is a function of f and a small
context D on the task's inputs (``circuitkit.verification.answers``) — three things must hold:

* **IIA** (the main criterion): among f-differing pairs, the patched prediction equals what f
  predicts, g(f(source), D(base)); CI low ≥ ``min_iia``.
* **moves**: change rate (f differs) − change rate (f agrees), CI low ≥ ``min_effect``.
* **stable**: sources agreeing on f (in the same stratum) leave the prediction unchanged: change
  rate CI high ≤ ``max_change_agree``.

A component that only adds margin (patching it never flips the answer, so it cannot "move") is judged at
the **logit level** instead of by IIA, which would be 0 by construction.  Among f-differing pairs whose
predicted answer y' differs from the base's y, take the shift of ℓ(y') against the median logit of the
answer's other possible values (those the task ever gives; y itself where there is no other): the *graded
IIA* is the share of that movement, summed over pairs, that is upward (CI low ≥ ``min_iia``).  The reference
is the other answers, not y, because any patch that weakens y raises every alternative against it.
Sources that agree on f must shift the base's margin (ℓ(y) against the same reference) by at most
``max_shift_ratio`` of what differing sources shift it, the difference's CI above 0.  Such a node is
"verified at the logit level" and reported as such.

A feature that predicts no answer (no relevant target) cannot be verified, however much patching
moves the output (a proxy such as the string's length).  Confidence intervals are Bonferroni-
adjusted over the relevant answers of one test, so "verified on some answer" keeps its level.
Tests draw their bases from the ``search`` half of the inputs; joint-feature and site-group
searches are re-tested on the held-out ``confirm`` half before anything is accepted.
A *site group* (``"a1.0@END & a1.2@END"``: sites at one position, patched together) tests a
feature that several components carry redundantly.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.hypotheses.features import AnyFeature, PositionalFeature, all_features
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.patching.node import interchange_logits
from circuitkit.results import SettingsRecord
from circuitkit.sites import Site, check_site, group_name, group_sites
from circuitkit.stats import (
    Estimate,
    diff_estimate,
    directional_share,
    estimate,
    proportion,
    proportion_diff,
)
from circuitkit.tasks.base import LAYOUT
from circuitkit.verification.answers import AnswerModel, FeatureCoder, fit_answer_model
from circuitkit.verification.causal import TokenEditPrediction, fit_token_edit, token_editable

SPLITS = ("search", "confirm")

#: upper bounds that keep a typo (an extra zero or three) from hanging the verifier for hours
MAX_INPUTS = 200_000
MAX_PAIRS = 100_000


@dataclass(frozen=True)
class VerifyThresholds(SettingsRecord):
    """Verdict rules, stated in every output."""

    min_iia: float = 0.8  # CI low of IIA on an answer f predicts
    min_effect: float = 0.1  # CI low of change(f differs) − change(f agrees)
    max_change_agree: float = 0.15  # CI high of change(f agrees), same stratum
    determining_purity: float = 0.99  # answer = g(f, D) on at least this share of inputs
    min_relevance: float = 0.1  # ... and D alone determines it on at least this share fewer
    max_context: int = 2  # |D| at most (besides what the pairs hold fixed)
    min_pairs: int = 30  # fewer pairs than this on either side: no verdict
    max_shift_ratio: float = 0.5  # logit level: agreeing sources shift the margin by at most this share
    logit_level: bool = True  # judge components that never flip the answer at the logit level
    confidence: float = 0.95  # family-wise over the relevant answers of one test (Bonferroni)

    def describe(self) -> str:
        return (f"sources are fair (they hold fixed the base's layout and what the feature's definition needs); "
                f"on an answer that f predicts (by the task's causal model where it applies: the answer of the base "
                f"with f's tokens copied from the source, moving the answer on >= {self.min_relevance} of aligned "
                f"pairs; else answer = g(f, D) on >= {self.determining_purity:.0%} of inputs for a context D of <= "
                f"{self.max_context} task features, which alone determines >= {self.min_relevance} less): verified when IIA CI low >= {self.min_iia}, CI low of [change rate when f differs − change "
                f"rate when f agrees] >= {self.min_effect} and CI high of the change rate when f agrees <= "
                f"{self.max_change_agree}; {self.confidence:.0%} intervals, Bonferroni-adjusted over the answers of a "
                f"test; >= {self.min_pairs} pairs per side; a feature that predicts no answer is never verified"
                + (f"; a component that never moves the answer is judged at the logit level instead: of the predicted "
                   f"answer's logit movement against the answer's other values, summed over differing pairs, a share "
                   f"with CI low >= {self.min_iia} is upward (graded IIA), and agreeing sources shift the base's "
                   f"margin by <= {self.max_shift_ratio:.0%} of what differing sources do" if self.logit_level else ""))


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
    iia_coverage: float | None  # share of differing pairs for which f predicts an answer
    answer_model: dict | None  # AnswerModel.to_dict() when f is relevant to this answer
    moves: bool
    iia_ok: bool
    stable: bool
    #: logit level (module doc): the upward share of the predicted answer's movement (graded IIA), and the mean
    #: |shift| of the base's margin under differing / agreeing sources
    graded_iia: Estimate | None = None
    shift_differ: Estimate | None = None
    shift_agree: Estimate | None = None
    graded_ok: bool = False

    @property
    def relevant(self) -> bool:
        return self.answer_model is not None

    @property
    def level(self) -> str | None:
        """"answer" (IIA on the argmax), "logit" (a margin-only component, judged on logits) or None."""
        if not (self.relevant and self.stable):
            return None
        if self.moves and self.iia_ok:
            return "answer"
        return "logit" if (not self.moves and self.graded_ok) else None

    @property
    def verified(self) -> bool:
        return self.level is not None

    @property
    def verified_iia(self) -> Estimate | None:
        """The IIA that verified (or would verify) this answer: the graded one at the logit level."""
        return self.graded_iia if self.level == "logit" else self.iia

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relevant"], d["verified"], d["level"] = self.relevant, self.verified, self.level
        return d


@dataclass
class Verdict:
    """Verification of one (site, feature set) under one condition (real or a null control)."""

    site: str
    features: tuple[str, ...]
    condition: str  # "real", "random_model", "shuffled_feature", "proxy"
    targets: list[TargetResult]
    verified: bool
    necessary_targets: list[str]  # answers where patching moves the output (differ − agree)
    verified_targets: list[str]
    note: str = ""
    split: str = "search"
    hold: tuple[str, ...] = ()
    confidence: float = 0.95  # the per-answer CI level used (after the Bonferroni adjustment)

    def best(self) -> TargetResult | None:
        """The verified (else relevant, else any) answer with the largest IIA / effect."""
        pool = ([r for r in self.targets if r.verified] or [r for r in self.targets if r.relevant]
                or list(self.targets))
        if not pool:
            return None
        return max(pool, key=lambda r: (r.level == "answer", (r.verified_iia.mean if r.verified_iia else -1.0),
                                        (r.effect.mean if r.effect else -1.0)))

    @property
    def level(self) -> str | None:
        """"answer" when some answer verifies on the argmax, "logit" when only logit-level ones do, else None."""
        levels = {r.level for r in self.targets if r.verified}
        return "answer" if "answer" in levels else ("logit" if levels else None)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "features": list(self.features), "condition": self.condition, "split": self.split,
                "hold": list(self.hold), "verified": self.verified, "level": self.level, "necessary_targets": self.necessary_targets,
                "verified_targets": self.verified_targets, "note": self.note, "confidence": self.confidence,
                "targets": [t.to_dict() for t in self.targets]}


# ---- the verifier -----------------------------------------------------------------------------------
class InterchangeVerifier:
    """Holds the task inputs (bases), their clean predictions and true answers, and runs the tests.

    ``inputs``: task texts used as bases (default ``n_inputs`` fresh ones), split at random into a
    ``search`` and a held-out ``confirm`` half.  Sources come from ``Task.fair_sources``
    (``n_candidates`` per base, from which one f-differing and one f-agreeing source are drawn).
    """

    #: bases visited per pair wanted before the search gives up on finding more agreeing sources
    max_bases_per_pair = 4

    def __init__(self, pm: ProbedModel, inputs: Sequence[str] | None = None, n_inputs: int = 3000,
                 n_pairs: int = 200, thresholds: VerifyThresholds | None = None,
                 features: Mapping[str, AnyFeature] | None = None, seed: int = 0, n_candidates: int = 24,
                 coder: FeatureCoder | None = None) -> None:
        self.pm = pm
        self.task = pm.task
        self.th = thresholds or VerifyThresholds()
        self.n_pairs = n_pairs
        self.n_candidates = n_candidates
        self.seed = seed
        if inputs is None:
            inputs = self.task.generate(random.Random(30_000 + seed), n_inputs)
        self.inputs = list(dict.fromkeys(inputs))
        if len(self.inputs) < 4:
            raise CircuitkitError(f"the verifier needs at least 4 distinct inputs, got {len(self.inputs)}")
        self.ids = self.task.encode(self.inputs)
        self.tokens = [self.task.tokens(t) for t in self.inputs]
        self.features = dict(features) if features is not None else all_features(self.task)
        self.coder = coder or FeatureCoder(self.task, self.features)
        self.targets = [self.task.targets(t) for t in self.tokens]
        #: a causal model's site affects only answers read at or after it; a bidirectional one's, every answer
        self.causal = bool(getattr(pm.runner.arch, "causal", True))
        self.target_names = list(dict.fromkeys(t.name for ts in self.targets for t in ts))
        self.task_feature_names = [f.name for f in self.task.task_features() if f.name in self.features]
        order = list(range(len(self.inputs)))
        random.Random(20_000 + seed).shuffle(order)
        half = len(order) // 2
        self.split_rows = {"search": sorted(order[:half]), "confirm": sorted(order[half:])}
        with torch.no_grad():
            logits = pm.runner.logits(self.ids.to(pm.device))
        self.clean_pred = logits.argmax(-1).cpu()  # [N, pos]
        #: per input, {answer position: clean logits [vocab]}, and per answer the tokens it takes on the inputs
        #: (the logit-level criterion's reference)
        self.clean_target_logits = [{t.position: logits[i, t.position].float().cpu() for t in ts}
                                    for i, ts in enumerate(self.targets)]
        self.answer_values: dict[str, list[int]] = {}
        for ts in self.targets:
            for t in ts:
                self.answer_values.setdefault(t.name, set()).add(t.token)  # type: ignore[arg-type]
        self.answer_values = {k: sorted(v) for k, v in self.answer_values.items()}
        self._answer_models: dict[tuple, AnswerModel | TokenEditPrediction | None] = {}
        self._candidates: dict[tuple, list[str]] = {}
        self._code_rows: dict[tuple, np.ndarray] = {}
        self._pair_cache: dict[tuple, tuple] = {}
        self._shuffle_map: dict[str, str] = {}

    def with_model(self, pm: ProbedModel) -> InterchangeVerifier:
        """The same inputs, splits, features and thresholds on another model (the random-init null control)."""
        other = InterchangeVerifier(pm, self.inputs, n_pairs=self.n_pairs, thresholds=self.th, features=self.features,
                                    seed=self.seed, n_candidates=self.n_candidates, coder=self.coder)
        # model-independent caches
        other._candidates, other._answer_models, other._code_rows = self._candidates, self._answer_models, self._code_rows
        other._pair_cache = self._pair_cache
        return other

    # ---- feature codes ----
    def codes(self, site: Site, feature: str) -> np.ndarray:
        """[N] codes of ``feature`` on every input, read at the site's position (−1 undefined)."""
        if feature not in self.features and feature != LAYOUT:
            raise CircuitkitError(f"unknown feature {feature!r} for task {self.task.name}")
        key = (site.position, feature)
        if key not in self._code_rows:
            self._code_rows[key] = np.array([self.code(feature, t, site.position) for t in self.inputs])
        return self._code_rows[key]

    def code(self, feature: str, text: str, position: str | int) -> int:
        """A feature's code on one text at a position; ``layout`` (``Task.layout``) is coded too."""
        if feature != LAYOUT:
            return self.coder.code(feature, text, position)
        toks = self.coder.tokens(text)
        if toks is None or self.coder.position(text, position) is None:
            return -1
        book = self.coder.books.setdefault(LAYOUT, {})
        return book.setdefault(self.task.layout(toks), len(book))

    def _shuffled_text(self, text: str) -> str:
        """The input whose feature values a text takes under the shuffled-feature control: a fixed
        pseudo-random input of the pool (same marginal distribution, no association with the text)."""
        t = self._shuffle_map.get(text)
        if t is None:
            t = self._shuffle_map[text] = self.inputs[zlib.crc32(f"{self.seed}|{text}".encode()) % len(self.inputs)]
        return t

    def _fcodes(self, features: Sequence[str], text: str, position: str | int, shuffle: bool) -> tuple[int, ...]:
        src = self._shuffled_text(text) if shuffle else text
        return tuple(self.coder.code(f, src, position) for f in features)

    # ---- what a feature predicts ----
    def answer_model(self, site: Site, features: Sequence[str], target: str
                     ) -> AnswerModel | TokenEditPrediction | None:
        """What ``features`` predict about answer ``target``, or None when they do not move it: the task's causal
        model where it applies (token-level variables of a task that answers any input: exact, see
        ``verification/causal.py``), else answer(target) = g(features, D) read off the inputs
        (``verification/answers.py``)."""
        if token_editable(self.task, self.features, features):
            key = ("token_edit", site.position, tuple(features), target)
            if key not in self._answer_models:
                self._answer_models[key] = fit_token_edit(self.task, self.features, features, target,
                                                          self.edit_pairs(site, features))
            edit_model = self._answer_models[key]
            if edit_model is not None:  # decided by the causal model: no data-driven second opinion
                assert isinstance(edit_model, TokenEditPrediction)
                return edit_model if edit_model.relevance >= self.th.min_relevance else None
        return self._data_driven_model(site, features, target)

    def edit_pairs(self, site: Site, features: Sequence[str], n: int = 400) -> list[tuple[list[str], list[str], int]]:
        """(base tokens, source tokens, site index) for up to ``n`` bases of the inputs with one of their fair
        sources each (the cached candidates the tests draw from): where the causal model's relevance is judged."""
        hold = self.task.holds_fixed(features, site.position)
        rows = [i for i in range(len(self.inputs)) if self.coder.position(self.inputs[i], site.position) is not None]
        random.Random(self.seed).shuffle(rows)
        out = []
        for i in rows[:n]:
            cands = self.candidates(i, hold)
            src = self.coder.tokens(cands[0]) if cands else None
            if src is not None:
                out.append((self.tokens[i], src, self.site_index(i, site)))
        return out

    def _data_driven_model(self, site: Site, features: Sequence[str], target: str) -> AnswerModel | None:
        """answer(target) = g(features, D) on the inputs (see ``circuitkit.verification.answers``), or None."""
        hold = [h for h in self.task.holds_fixed(features, site.position) if h not in features]
        context = [f for f in self.task_feature_names if f not in features and f not in hold]
        # features that do not read the position give the same model wherever the position exists
        positional = any(isinstance(self.features[f], PositionalFeature) for f in list(features) + context
                         if f in self.features)
        where = site.position if positional else self.has_position(site).tobytes()
        key = (where, tuple(features), tuple(hold), target)
        if key not in self._answer_models:
            frows = np.stack([self.codes(site, f) for f in features])
            crows = np.stack([self.codes(site, f) for f in context]) if context else np.zeros(
                (0, len(self.inputs)), dtype=np.int64)
            fixed = np.stack([self.codes(site, h) for h in hold]) if hold else None
            answers = np.array([next((t.token for t in ts if t.name == target), -1) for ts in self.targets])
            th = self.th
            self._answer_models[key] = fit_answer_model(target, frows, features, crows, context, answers,
                                                        th.determining_purity, th.min_relevance, th.max_context,
                                                        fixed_rows=fixed, fixed_names=hold)
        return self._answer_models[key]

    def has_position(self, site: Site) -> np.ndarray:
        """[N] bool: the inputs in which the site's position exists."""
        key = ("__has__", site.position)
        if key not in self._code_rows:
            self._code_rows[key] = np.array([self.coder.position(t, site.position) is not None for t in self.inputs])
        return self._code_rows[key]

    # ---- pairs ----
    def fair_pairs(self, site: Site, features: Sequence[str], split: str = "search", shuffle: bool = False,
                   rng: random.Random | None = None, n_pairs: int | None = None
                   ) -> tuple[list[int], list[str], list[int], list[str]]:
        """(differ bases, differ sources, agree bases, agree sources): base rows of the split and fair
        sources whose features differ from (any of them) / agree with (all of them) the base's."""
        if split not in SPLITS:
            raise CircuitkitError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        n = n_pairs or self.n_pairs
        rng = rng or random.Random(self.seed)
        hold = self.task.holds_fixed(features, site.position)
        rows = list(self.split_rows[split])
        rng.shuffle(rows)
        db, ds, ab, as_ = [], [], [], []
        no_agree: list[int] = []
        for visited, i in enumerate(rows):
            if (len(db) >= n and len(ab) >= n) or visited >= self.max_bases_per_pair * n:
                break  # enough pairs, or agreeing sources are too rare to reach n (reported as fewer pairs)
            text = self.inputs[i]
            if self.coder.position(text, site.position) is None:
                continue  # e.g. A4 of a sum with a 3-digit answer
            fb = self._fcodes(features, text, site.position, shuffle)
            if min(fb) < 0:
                continue
            cands = self.candidates(i, hold)
            differ, agree = [], []
            for c in cands:
                fc = self._fcodes(features, c, site.position, shuffle)
                if min(fc) < 0 or self.coder.position(c, site.position) is None:
                    continue
                (agree if fc == fb else differ).append(c)
            if differ and len(db) < n:
                db.append(i)
                ds.append(differ[rng.randrange(len(differ))])
            if agree and len(ab) < n:
                ab.append(i)
                as_.append(agree[rng.randrange(len(agree))])
            elif not agree:
                no_agree.append(i)
        if len(ab) < n and not shuffle and set(features) <= set(self.task_feature_names):
            # agreeing sources are rare among the candidates (e.g. a joint of several column sums): draw
            # them from the stratum that also holds the features fixed (a second pass; bases that found
            # one among the candidates keep it, so results where agreement is common do not move)
            for i in no_agree:
                if len(ab) >= n:
                    break
                fb = self._fcodes(features, self.inputs[i], site.position, False)
                agree = [c for c in self.agreeing_candidates(i, tuple(hold) + tuple(f for f in features if f not in hold))
                         if self.coder.position(c, site.position) is not None
                         and self._fcodes(features, c, site.position, False) == fb]
                if agree:
                    ab.append(i)
                    as_.append(agree[rng.randrange(len(agree))])
        return db, ds, ab, as_

    def agreeing_candidates(self, row: int, hold: Sequence[str]) -> list[str]:
        """A few fair sources for base ``row`` that share everything in ``hold`` (cached like ``candidates``)."""
        key = ("agree", row, tuple(hold))
        got = self._candidates.get(key)
        if got is None:
            rng = random.Random(zlib.crc32(f"{self.seed}|{row}|agree|{'|'.join(hold)}".encode()))
            try:
                got = self.task.fair_sources(self.inputs[row], rng, 4, hold)
            except CircuitkitError:
                got = []
            self._candidates[key] = got
        return got

    def candidates(self, row: int, hold: Sequence[str]) -> list[str]:
        """The fair sources drawn for base ``row`` under ``hold`` (cached: every test with the same hold
        picks its differing and agreeing sources from the same candidates, drawn with a seed of their own)."""
        key = (row, tuple(hold))
        got = self._candidates.get(key)
        if got is None:
            rng = random.Random(zlib.crc32(f"{self.seed}|{row}|{'|'.join(hold)}".encode()))
            try:
                got = self.task.fair_sources(self.inputs[row], rng, self.n_candidates, hold)
            except CircuitkitError:
                got = []
            self._candidates[key] = got
        return got

    def _patched_logits(self, sites: Sequence[Site], bases: Sequence[int], sources: Sequence[str]) -> Tensor:
        """Logits [b, pos, vocab] of the bases with the sites patched from the sources (on the CPU)."""
        if not bases:
            return torch.zeros(0, self.ids.shape[1], 1)
        return interchange_logits(self.pm, self.ids[list(bases)], self.task.encode(list(sources)), list(sites)).cpu()

    def site_index(self, row: int, site: Site) -> int:
        return self.task.resolve_position(site.position, self.tokens[row])

    def changes(self, site: Site, bases: Sequence[int], pred: Tensor) -> dict[str, np.ndarray]:
        """{target: [n] 1.0 where the prediction at that answer changed}, answers read at/after the site (every
        answer in a bidirectional model)."""
        out: dict[str, list[float]] = {}
        for r, i in enumerate(bases):
            p = self.site_index(i, site)
            for t in self.targets[i]:
                if t.position >= p or not self.causal:
                    out.setdefault(t.name, []).append(float(pred[r, t.position] != self.clean_pred[i, t.position]))
        return {k: np.array(v) for k, v in out.items()}

    def predictions(self, site: Site, features: Sequence[str], am: AnswerModel | TokenEditPrediction,
                    bases: Sequence[int], sources: Sequence[str], shuffle: bool = False
                    ) -> tuple[list[tuple[int, int, int, int]], int]:
        """([(pair row, base row, answer position, predicted token)] for pairs whose answer ``am.target`` is read
        at or after the site (anywhere in a bidirectional model) and for which the features predict an answer, n pairs
        without a prediction)."""
        out, missing = [], 0
        for r, (i, src) in enumerate(zip(bases, sources, strict=False)):
            t = next((t for t in self.targets[i] if t.name == am.target), None)
            p = self.site_index(i, site)
            if t is None or (t.position < p and self.causal):
                continue
            if isinstance(am, TokenEditPrediction):  # the features take the (shuffled) source's tokens
                src_toks = self.coder.tokens(self._shuffled_text(src) if shuffle else src)
                want = None if src_toks is None else am.predict_pair(self.tokens[i], src_toks, p)
            else:
                fsrc = self._fcodes(features, src, site.position, shuffle)
                ctx = tuple(self.code(c, self.inputs[i], site.position) for c in am.context)
                want = am.predict(fsrc, ctx)
            if want is None:
                missing += 1
                continue
            out.append((r, i, t.position, int(want)))
        return out, missing

    def iia_hits(self, site: Site, features: Sequence[str], am: AnswerModel | TokenEditPrediction,
                 bases: Sequence[int], sources: Sequence[str], pred: Tensor, shuffle: bool = False
                 ) -> tuple[np.ndarray, int]:
        """([k] 1.0 where the patched answer [b, pos] is what the features predict, n pairs without a prediction)."""
        wants, missing = self.predictions(site, features, am, bases, sources, shuffle)
        return np.array([float(int(pred[r, pos]) == want) for r, _, pos, want in wants]), missing

    def _reference(self, target: str, d: Tensor, *exclude: int) -> Tensor:
        """The median logit shift [] over the answer's other values (``answer_values`` minus ``exclude``), or the
        shift of the first excluded token where the answer has no other value."""
        others = [a for a in self.answer_values.get(target, []) if a not in exclude]
        return d[others].median() if others else d[exclude[-1]]

    def directional_shifts(self, target: str, wants: Sequence[tuple[int, int, int, int]], logits: Tensor
                           ) -> np.ndarray:
        """Logit level: [k] shift of the predicted answer y' against the answer's other values, over the pairs of
        ``wants`` (``predictions``) whose y' differs from the base's clean answer y."""
        out = []
        for r, i, pos, want in wants:
            y = int(self.clean_pred[i, pos])
            if want == y:
                continue  # no direction to move in
            d = logits[r, pos].float() - self.clean_target_logits[i][pos]  # [vocab]
            out.append(float(d[want] - self._reference(target, d, want, y)))
        return np.array(out)

    def margin_shifts(self, site: Site, bases: Sequence[int], logits: Tensor) -> dict[str, np.ndarray]:
        """{answer: [n] |shift| of the base's margin ℓ(y) against the answer's other values} (y its clean answer),
        answers read at or after the site: how far a patch moves the base's own answer, flipped or not."""
        out: dict[str, list[float]] = {}
        for r, i in enumerate(bases):
            p = self.site_index(i, site)
            for t in self.targets[i]:
                if t.position >= p or not self.causal:
                    y = int(self.clean_pred[i, t.position])
                    d = logits[r, t.position].float() - self.clean_target_logits[i][t.position]
                    out.setdefault(t.name, []).append(abs(float(d[y] - self._reference(t.name, d, y))))
        return {k: np.array(v) for k, v in out.items()}

    def _logit_level(self, target: str, wants: Sequence[tuple[int, int, int, int]], logits_d: Tensor,
                     shift_d: np.ndarray, shift_a: np.ndarray, conf: float
                     ) -> tuple[Estimate | None, Estimate, Estimate, bool]:
        """(graded IIA, mean |margin shift| when f differs / agrees, verdict) of the logit level (module doc)."""
        g = self.directional_shifts(target, wants, logits_d)
        graded = directional_share(g, conf) if g.size else None
        s_d, s_a = estimate(shift_d, conf), estimate(shift_a, conf)
        gap = diff_estimate(shift_d, shift_a, conf)
        th = self.th
        ok = bool(graded is not None and graded.n >= th.min_pairs and graded.ci_low >= th.min_iia
                  and s_a.mean <= th.max_shift_ratio * s_d.mean and gap.ci_low > 0)
        return graded, s_d, s_a, ok

    # ---- tests ----
    def downstream_targets(self, site: Site) -> list[str]:
        """Answers read at or after the site's position in some input (the only ones it can affect in a causal model;
        in a bidirectional one, every answer)."""
        key = ("__downstream__", site.position)
        if key not in self._code_rows:
            names: dict[str, None] = {}
            for text, ts in zip(self.inputs[:500], self.targets[:500], strict=False):
                p = self.coder.position(text, site.position)
                if p is not None:
                    names.update((t.name, None) for t in ts if t.position >= p or not self.causal)
            self._code_rows[key] = list(names)  # type: ignore[assignment]
        return self._code_rows[key]  # type: ignore[return-value]

    def predicts_an_answer(self, site: Site | str, features: Sequence[str]) -> bool:
        """Whether ``features`` predict some answer downstream of the site (else IIA is undefined and the
        hypothesis cannot be verified, whatever patching shows)."""
        s = group_sites(site)[0]
        return any(self.answer_model(s, features, t) is not None for t in self.downstream_targets(s))

    def _checked_test_args(self, site: Site | str | Sequence[Site], features: Sequence[str], family: int
                           ) -> tuple[list[Site], list[str]]:
        """The sites and features of a test, validated (family, sites, a position, known features) before patching."""
        if family < 1:
            raise CircuitkitError(f"family must be a positive number of tests, got {family}")
        sites = group_sites(site)
        for x in sites:
            check_site(x, self.pm.n_layers, self.pm.n_heads)
        site0 = sites[0]  # features and answers are read at the group's one position
        if site0.position is None:
            raise CircuitkitError(f"site {site0} needs a position")
        features = list(features)
        for f in features:
            if f not in self.features:
                raise CircuitkitError(f"unknown feature {f!r} for task {self.task.name}")
        return sites, features

    def _test_pairs(self, label: str, site0: Site, features: list[str], split: str, shuffle: bool
                    ) -> tuple[list[int], list[str], list[int], list[str]]:
        """The fair pairs of a test, cached by (label, features, split, shuffle) so the null model gets the same."""
        key = (label, tuple(features), split, shuffle)
        if key not in self._pair_cache:  # model-independent: the null model is tested on the same pairs
            rng = random.Random(zlib.crc32(f"{label}|{'|'.join(features)}|{self.seed}|{split}|{shuffle}".encode()))
            self._pair_cache[key] = self.fair_pairs(site0, features, split, shuffle, rng)
        return self._pair_cache[key]

    def added_shift(self, group: Site | str | Sequence[Site], member: Site | str, features: Sequence[str],
                    split: str = "search") -> dict[str, Estimate]:
        """{answer: mean and CI of the paired difference [k] of the directional shift (``directional_shifts``) with
        ``member`` patched in ``group`` minus without it}, over the group's own f-differing pairs of ``split`` (those
        its ``test`` draws): how much the member adds to the group's movement the way the features predict.  A
        member that carries nothing about f adds nothing in expectation, so a CI above 0 is evidence that it
        carries part of f (``verification/report.py``: joining a carrier)."""
        sites, features = self._checked_test_args(group, features, 1)
        drop = group_sites(member)[0]
        rest = [s for s in sites if s != drop]
        if len(rest) != len(sites) - 1 or not rest:
            raise CircuitkitError(f"{drop} must be one of the sites of {group_name(sites)}, beside others")
        site0 = sites[0]
        db, ds, _, _ = self._test_pairs(group_name(sites), site0, features, split, False)
        with_m, without_m = self._patched_logits(sites, db, ds), self._patched_logits(rest, db, ds)
        out: dict[str, Estimate] = {}
        for name in self.target_names:
            am = self.answer_model(site0, features, name)
            if am is None:
                continue
            wants, _ = self.predictions(site0, features, am, db, ds)
            a, b = self.directional_shifts(name, wants, with_m), self.directional_shifts(name, wants, without_m)
            if a.size:
                out[name] = estimate(a - b, self.th.confidence)
        return out

    def test(self, site: Site | str | Sequence[Site], features: Sequence[str], condition: str = "real",
             shuffle: bool = False, split: str = "search", skip_unpredictive: bool = False,
             family: int = 1) -> Verdict:
        """IIA, moves and stable (see the module docstring) of ``site`` carrying ``features``; a site group
        (``"a1.0@END & a1.2@END"`` or a list) is patched as one.  ``skip_unpredictive``: when the features
        predict no downstream answer, return the (unverifiable) verdict without patching.  ``family``: the
        number of tests this one is judged among (a confirmation that may fall back to a second candidate):
        intervals are Bonferroni-adjusted over it as well as over the answers."""
        sites, features = self._checked_test_args(site, features, family)
        site0 = sites[0]  # features and answers are read at the group's one position
        label = group_name(sites)
        hold = tuple(self.task.holds_fixed(features, site0.position))
        if skip_unpredictive and not self.predicts_an_answer(site0, features):
            return Verdict(label, tuple(features), condition, [], False, [], [],
                           f"{', '.join(features)} predicts no answer downstream of the site: IIA undefined, not "
                           "verifiable (not patched)", split, hold, self.th.confidence)
        db, ds, ab, as_ = self._test_pairs(label, site0, features, split, shuffle)
        logits_d, logits_a = self._patched_logits(sites, db, ds), self._patched_logits(sites, ab, as_)
        pred_d, pred_a = logits_d.argmax(-1), logits_a.argmax(-1)
        ch_d, ch_a = self.changes(site0, db, pred_d), self.changes(site0, ab, pred_a)
        sh_d: dict[str, np.ndarray] = {}
        sh_a: dict[str, np.ndarray] = {}
        if self.th.logit_level:
            sh_d, sh_a = self.margin_shifts(site0, db, logits_d), self.margin_shifts(site0, ab, logits_a)
        models = {name: self.answer_model(site0, features, name) for name in self.target_names}
        k = max(1, sum(m is not None for name, m in models.items() if name in ch_d or name in ch_a))
        conf = 1 - (1 - self.th.confidence) / (k * family)
        results = []
        for name in self.target_names:
            xd, xa = ch_d.get(name, np.zeros(0)), ch_a.get(name, np.zeros(0))
            if xd.size == 0 and xa.size == 0:
                continue  # answer read before the site (or no pairs): it cannot be affected
            results.append(self._target_result(name, site0, features, models[name], xd, xa, db, ds, pred_d, logits_d,
                                               sh_d, sh_a, shuffle, conf))
        nec = [r.target for r in results if r.moves]
        ver = [r.target for r in results if r.verified]
        return Verdict(label, tuple(features), condition, results, bool(ver), nec, ver,
                       self._verdict_note(results, features), split, hold, round(conf, 6))

    def _target_result(self, name: str, site0: Site, features: list[str], am: AnswerModel | TokenEditPrediction | None,
                       xd: np.ndarray, xa: np.ndarray, db: list[int], ds: list[str], pred_d: Tensor, logits_d: Tensor,
                       sh_d: dict[str, np.ndarray], sh_a: dict[str, np.ndarray], shuffle: bool, conf: float
                       ) -> TargetResult:
        """One answer's effect, change when agreeing, IIA and verdicts (and the logit level where it applies)."""
        th = self.th
        enough = xd.size >= th.min_pairs and xa.size >= th.min_pairs
        e_d = proportion(xd, conf) if xd.size else None
        e_a = proportion(xa, conf) if xa.size else None
        eff = proportion_diff(xd, xa, conf) if xd.size and xa.size else None
        iia, cov, wants = None, None, []
        if am is not None and db:
            wants, missing = self.predictions(site0, features, am, db, ds, shuffle)
            hits = np.array([float(int(pred_d[r, pos]) == want) for r, _, pos, want in wants])
            cov = float(hits.size / max(1, hits.size + missing))
            iia = proportion(hits, conf) if hits.size else None
        moves = bool(enough and eff is not None and eff.ci_low >= th.min_effect)
        iia_ok = bool(enough and iia is not None and iia.n >= th.min_pairs and iia.ci_low >= th.min_iia)
        stable = bool(enough and e_a is not None and e_a.ci_high <= th.max_change_agree)
        graded, s_d, s_a, graded_ok = None, None, None, False
        # the logit level judges what the argmax cannot: a relevant answer that the patch does not move
        if th.logit_level and enough and wants and not moves and name in sh_d and name in sh_a:
            graded, s_d, s_a, graded_ok = self._logit_level(name, wants, logits_d, sh_d[name], sh_a[name], conf)
        return TargetResult(name, int(xd.size), int(xa.size), e_d, e_a, eff, iia, cov,
                            am.to_dict() if am is not None else None, moves, iia_ok, stable,
                            graded, s_d, s_a, graded_ok)

    def _verdict_note(self, results: Sequence[TargetResult], features: Sequence[str]) -> str:
        """Why a test could not judge: no answer downstream, none predicted, or too few agreeing sources."""
        th = self.th
        notes = []
        if not results:
            notes.append("no answer is read at or after this position, or no fair pairs were found")
        elif not any(r.relevant for r in results):
            notes.append(f"{', '.join(features)} predicts no answer (no context D makes the answer a function of it):"
                         " IIA undefined, not verifiable")
        if results and all(r.n_agree < th.min_pairs for r in results):
            notes.append(f"fewer than {th.min_pairs} fair sources agree on {', '.join(features)}")
        return "; ".join(notes)


__all__ = ["MAX_INPUTS", "MAX_PAIRS", "VerifyThresholds", "TargetResult", "Verdict", "InterchangeVerifier", "SPLITS"]
