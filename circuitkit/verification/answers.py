"""What a feature predicts about an answer: the data-driven causal model behind IIA.

Interchange-intervention accuracy (IIA) asks whether patching a site from a source makes the
output what the *feature* predicts: the answer the task would give with the feature set to its
source value and everything else left as in the base.  For that we need the task's answer as a
function of the feature and some *context*, read off the task's own inputs:

    answer(x) = g(f(x), D(x))   on ≥ ``purity`` of the inputs,

with D a small set of other task features (counting: ``count(query)`` alone determines the count,
D = ∅; addition: A2 = g(F2, {S2, carry(3)}); IOI: the answer is ``IO``, or g(S, {names})).  The
feature must *matter*: D alone determines the answer on at least ``min_relevance`` fewer inputs
than f ∪ D.  The prediction for a base/source pair is g(f(source), D(base)); pairs whose
combination never occurs among the inputs get no prediction (reported as coverage).

``FeatureCoder`` gives integer codes of features on any text at a named position, with one code
book per feature (so codes of sources, bases and the input pool compare).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from math import comb

import numpy as np

from circuitkit.errors import CircuitkitError
from circuitkit.hypotheses.features import AnyFeature, evaluate
from circuitkit.tasks.base import Task


class FeatureCoder:
    """Codes (−1 = undefined) of named features on texts, each read at a (named) position."""

    def __init__(self, task: Task, features: Mapping[str, AnyFeature]) -> None:
        self.task = task
        self.features = dict(features)
        self.books: dict[str, dict[Hashable, int]] = {}
        self._tokens: dict[str, list[str] | None] = {}
        self._pos: dict[tuple[str, str | int], int | None] = {}
        self._codes: dict[tuple[str, str, str | int], int] = {}

    def tokens(self, text: str) -> list[str] | None:
        """``Task.try_tokens``, cached per text."""
        if text not in self._tokens:
            self._tokens[text] = self.task.try_tokens(text)
        return self._tokens[text]

    def position(self, text: str, position: str | int) -> int | None:
        """The index of ``position`` in ``text`` (None when the input has no such position)."""
        key = (text, position)
        if key not in self._pos:
            toks = self.tokens(text)
            try:
                self._pos[key] = None if toks is None else self.task.resolve_position(position, toks)
            except CircuitkitError:
                self._pos[key] = None
        return self._pos[key]

    def code(self, feature: str, text: str, position: str | int) -> int:
        key = (feature, text, position)
        c = self._codes.get(key)
        if c is None:
            if feature not in self.features:
                raise CircuitkitError(f"unknown feature {feature!r} for task {self.task.name}")
            toks, p = self.tokens(text), self.position(text, position)
            v = None if toks is None or p is None else evaluate(self.features[feature], toks, p)
            c = -1
            if v is not None:
                book = self.books.setdefault(feature, {})
                try:
                    c = book.setdefault(v, len(book))
                except TypeError:  # unhashable value: undefined
                    c = -1
            self._codes[key] = c
        return c

    def codes(self, features: Sequence[str], texts: Sequence[str], position: str | int) -> np.ndarray:
        """[len(features), len(texts)] int codes."""
        out = np.full((len(features), len(texts)), -1, dtype=np.int64)
        for i, f in enumerate(features):
            for j, t in enumerate(texts):
                out[i, j] = self.code(f, t, position)
        return out

    def value(self, feature: str, code: int) -> Hashable | None:
        for v, c in self.books.get(feature, {}).items():
            if c == code:
                return v
        return None


def _compact(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Codes -> (dense ids 0..k-1, k)."""
    uniq, inv = np.unique(x, return_inverse=True)
    return inv.reshape(-1), int(uniq.size)


def _combine(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> tuple[np.ndarray, int]:
    """Dense ids of the pairs (a, b)."""
    if na * nb <= 4 * a.size:
        return a * nb + b, na * nb  # sparse but small: bincount-able as is
    return _compact(a * nb + b)


def _group_ids(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """rows [k, n] of codes -> ([n] ids of the distinct columns, number of ids); k = 0: one group."""
    gid, ng = np.zeros(rows.shape[1], dtype=np.int64), 1
    for r in rows:
        c, nc = _compact(r)
        gid, ng = _combine(gid, ng, c, nc)
    return gid, ng


def _purity_ids(gid: np.ndarray, ng: int, a: np.ndarray, na: int) -> float:
    if gid.size == 0:
        return 0.0
    if ng * na > 50 * gid.size:
        gid, ng = _compact(gid)
    counts = np.bincount(gid * na + a, minlength=ng * na).reshape(ng, na)
    return float(counts.max(1).sum() / gid.size)


def purity(rows: np.ndarray, answers: np.ndarray) -> float:
    """Share of items whose answer is the most common answer of their group (groups = equal columns)."""
    if answers.size == 0:
        return 0.0
    a, na = _compact(answers)
    return _purity_ids(*_group_ids(rows), a, na)


@dataclass
class AnswerModel:
    """answer = g(features, context) for one target, read off the inputs; see the module docstring."""

    target: str
    features: tuple[str, ...]
    context: tuple[str, ...]
    purity: float  # of (features ∪ context) -> answer
    context_purity: float  # of context alone -> answer
    table: dict[tuple[int, ...], int] = field(repr=False, default_factory=dict)  # codes -> answer token id

    def predict(self, feature_codes: Sequence[int], context_codes: Sequence[int]) -> int | None:
        return self.table.get(tuple(int(c) for c in feature_codes) + tuple(int(c) for c in context_codes))

    def describe(self) -> str:
        ctx = f" given {', '.join(self.context)}" if self.context else ""
        return f"{self.target} = g({', '.join(self.features)}{ctx}) on {self.purity:.1%} of inputs"

    method = "data-driven g(f, D)"  # as verification JSONs name how a prediction was made

    def to_dict(self) -> dict:
        return {"target": self.target, "features": list(self.features), "context": list(self.context),
                "purity": round(self.purity, 4), "context_purity": round(self.context_purity, 4),
                "method": self.method}


def fit_answer_model(target: str, feature_rows: np.ndarray, features: Sequence[str], context_rows: np.ndarray,
                     context_names: Sequence[str], answers: np.ndarray, min_purity: float = 0.99,
                     min_relevance: float = 0.1, max_context: int = 2, beam: int = 8,
                     max_exhaustive: int = 600, fixed_rows: np.ndarray | None = None,
                     fixed_names: Sequence[str] = ()) -> AnswerModel | None:
    """The smallest context D (up to ``max_context`` of ``context_names``) with which ``features``
    determine the answer (purity ≥ ``min_purity``) and matter (purity − purity(D) ≥ ``min_relevance``).

    Contexts are searched breadth-first, smallest first: every context of a size while there are at most
    ``max_exhaustive`` of them, else the ``beam`` best relevant ones of the size below extended by one more
    feature.  feature_rows [k, n], context_rows [m, n]: codes on n inputs (−1 undefined: inputs where a
    feature is undefined are left out); answers [n] token ids (−1 = no such target).  ``fixed_rows`` [j, n] (``fixed_names``): context that is always part
    of D and not counted in its size — what the interchange pairs hold fixed (the layout, the query
    letter), since the answer is only needed within such a stratum; each context is tried without them
    first (coarser groups are better supported by a few thousand inputs).  An undefined context value (−1)
    counts as a value of its own.  None when no D qualifies."""
    if fixed_rows is not None and len(fixed_names):
        context_rows = np.concatenate([fixed_rows, context_rows])
        context_names = list(fixed_names) + list(context_names)
        fixed = tuple(range(len(fixed_names)))
    else:
        context_names, fixed = list(context_names), ()
    # an undefined context value (−1) is a value of its own; the features and the answer must be defined
    ok = (feature_rows >= 0).all(0) & (answers >= 0)
    if ok.sum() < 20:
        return None
    a, na = _compact(answers[ok])
    fg, nf = _group_ids(feature_rows[:, ok])
    comp = [_compact(r[ok]) for r in context_rows]
    gfix, nfix = np.zeros(int(ok.sum()), dtype=np.int64), 1
    for j in fixed:
        gfix, nfix = _combine(gfix, nfix, *comp[j])

    def score(combo: tuple[int, ...], with_fixed: bool) -> tuple[float, float]:
        cg, nc = (gfix, nfix) if with_fixed else (np.zeros_like(gfix), 1)
        for j in combo:
            cg, nc = _combine(cg, nc, *comp[j])
        return _purity_ids(*_combine(fg, nf, cg, nc), a, na), _purity_ids(cg, nc, a, na)

    best: tuple | None = None
    frontier: list[tuple[int, ...]] = [()]
    free = range(len(fixed), len(context_names))
    for size in range(max_context + 1):
        scored = []
        for combo in frontier:
            # without the held context first (coarser groups, better supported by the inputs), then with it
            for with_fixed in ((False, True) if fixed else (False,)):
                p, pc = score(combo, with_fixed)
                if p >= min_purity and p - pc >= min_relevance and (best is None or p > best[0]):
                    best = (p, pc, (fixed if with_fixed else ()) + combo)
                    break
            scored.append((p - pc, p, combo))
        if best is not None or size == max_context:
            break
        if comb(len(free), size + 1) <= max_exhaustive:  # every context of the next size
            frontier = list(combinations(free, size + 1))
            continue
        # too many: extend the most promising relevant contexts by one more feature
        scored.sort(key=lambda t: (-t[1], -t[0]))
        keep = [c for rel, p, c in scored if rel > 0][:beam] if size else [()]
        frontier = sorted({tuple(sorted(c + (j,))) for c in keep for j in free if j not in c})
    if best is None:
        return None
    p, pc, combo = best
    rows = np.concatenate([feature_rows, context_rows[list(combo)]])[:, ok] if combo else feature_rows[:, ok]
    table: dict[tuple[int, ...], dict[int, int]] = {}
    for col, a in zip(rows.T.tolist(), answers[ok].tolist()):
        counts = table.setdefault(tuple(col), {})
        counts[a] = counts.get(a, 0) + 1
    g = {k: max(v, key=v.get) for k, v in table.items()}
    return AnswerModel(target, tuple(features), tuple(context_names[i] for i in combo), p, pc, g)


__all__ = ["FeatureCoder", "AnswerModel", "fit_answer_model", "purity"]
