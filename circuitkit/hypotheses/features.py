"""Features of inputs: what a hypothesis says an activation site carries.

Two kinds of feature:

* ``Feature`` (from the Task API): a function of the input's token list, e.g. ``count(query)``,
  ``F2``, ``carry(2)``, ``tok@3``.
* ``PositionalFeature``: a function of the token list *and a position* — the position where
  the site was read (for a query) or where a preimage sample matched the query (the argmin of
  the InversionView distance).  ``tok@p-1`` is "the token just before the matched position".

Generic features come free for every task: the token at each absolute position and equality of
two absolute positions (short sequences only) (``generic_features``); the token at the matched
position ± k, the count of that token, and the length and count of each token up to the position
(``positional_features``).  Tasks add their own and compositions (carries, digit sums) in
``Task.task_features``.

``FeatureTable`` evaluates many features on many (input, position) items once and stores
integer codes (−1 = undefined), so scoring compares codes with numpy instead of calling Python
functions per sample.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from circuitkit.tasks.base import Feature, Tokens

if TYPE_CHECKING:
    from circuitkit.tasks.base import Task

#: relative offsets of the generic ``tok@p±k`` features (causal models read only p and before)
RELATIVE_OFFSETS = (0, -1, -2, -3)
#: equality features ``eq@i,j`` are generated for sequences at most this long (O(n²) of them)
MAX_EQ_SEQ_LEN = 16


@dataclass(frozen=True)
class PositionalFeature:
    """A named function of (tokens, position); ``None`` means undefined.  ``reads``: offsets from the position
    of the tokens the feature *is* (``tok@p-1``: (-1,)), for the generic causal model (``Feature.reads``)."""

    name: str
    fn: Callable[[Tokens, int], Hashable | None] = field(compare=False)
    description: str = ""
    reads: tuple[int, ...] = ()

    def __call__(self, tokens: Tokens, position: int) -> Hashable | None:
        try:
            return self.fn(tokens, position)
        except (IndexError, ValueError, KeyError, TypeError):
            return None


AnyFeature = Feature | PositionalFeature


def evaluate(feature: AnyFeature, tokens: Tokens, position: int | None) -> Hashable | None:
    """The feature's value on an input (``position`` is used by positional features only)."""
    if isinstance(feature, PositionalFeature):
        return None if position is None else feature(tokens, position)
    return feature(tokens)


def token_at(tokens: Tokens, k: int) -> str | None:
    """The token at index k (k ≥ 0), or None when out of range."""
    return tokens[k] if 0 <= k < len(tokens) else None


def generic_features(task: Task) -> list[Feature]:
    """Input-only generic features: the token at each absolute position and equality of two positions.

    (Length and token counts are positional: they count up to the site's position, see
    ``positional_features``, so a site is never credited with tokens it cannot have seen.)
    """
    feats = []
    for k in range(task.seq_len):
        feats.append(Feature(f"tok@{k}", lambda t, k=k: token_at(t, k), f"the token at absolute position {k}",
                             reads=(k,)))
    if task.seq_len <= MAX_EQ_SEQ_LEN:
        for i in range(1, task.seq_len):
            for j in range(i + 1, task.seq_len):
                feats.append(Feature(f"eq@{i},{j}", lambda t, i=i, j=j: _eq(t, i, j),
                                     f"the tokens at positions {i} and {j} are equal"))
    return feats


def _eq(t: Tokens, i: int, j: int) -> bool | None:
    a, b = token_at(t, i), token_at(t, j)
    return None if a is None or b is None else a == b


def _upto(t: Tokens, p: int) -> list[str]:
    if not 0 <= p < len(t):
        raise IndexError(p)
    return list(t[: p + 1])


def positional_features(task: Task) -> list[PositionalFeature]:
    """Generic features of the position p (the site's position for a query, the matched position for a
    preimage sample): tok@p±k, count(tok@p), p itself, and — counted over tokens 0..p only —
    the length and the count of each token."""
    specials = {task.vocab.bos, task.vocab.eos, task.vocab.pad}
    feats = []
    for k in RELATIVE_OFFSETS:
        name = "tok@p" if k == 0 else f"tok@p{k:+d}"
        feats.append(PositionalFeature(name, lambda t, p, k=k: token_at(t, p + k),
                                       f"the token at the matched position {k:+d}", reads=(k,)))
    feats.append(PositionalFeature("count(tok@p)", lambda t, p: _upto(t, p).count(t[p]),
                                   "occurrences of the token at p among tokens 0..p"))
    feats.append(PositionalFeature("p", lambda t, p: p, "the matched position itself"))
    feats.append(PositionalFeature("length", lambda t, p: sum(1 for x in _upto(t, p) if x not in specials),
                                   "non-special tokens among tokens 0..p"))
    if len(task.vocab) <= 64:  # counting a token is only meaningful for small symbolic vocabularies
        for tok in task.vocab.tokens:
            if tok not in specials:
                feats.append(PositionalFeature(f"count({tok})", lambda t, p, tok=tok: _upto(t, p).count(tok),
                                               f"occurrences of {tok!r} among tokens 0..p"))
    return feats


def all_features(task: Task, positional: bool = True) -> dict[str, AnyFeature]:
    """Task features (which win name clashes) + generic + (optionally) positional features."""
    feats: dict[str, AnyFeature] = dict(task.features())
    if positional:
        for f in positional_features(task):
            feats.setdefault(f.name, f)
    return feats


_ABS_RE = re.compile(r"^tok@(\d+)$")
_EQ_RE = re.compile(r"^eq@(\d+),(\d+)$")


def reads_beyond(name: str, position: int) -> bool:
    """True when a generic feature reads a token after ``position`` (a causal site cannot carry it)."""
    m = _ABS_RE.match(name)
    if m:
        return int(m.group(1)) > position
    m = _EQ_RE.match(name)
    if m:
        return max(int(m.group(1)), int(m.group(2))) > position
    return False


def kind_rank(name: str, task_feature_names: Iterable[str]) -> int:
    """Preference when several features are aliases: task features, absolute generic, positional."""
    if name in set(task_feature_names):
        return 0
    if "@p" in name or name == "p":
        return 2
    return 1


@dataclass
class FeatureTable:
    """Integer codes of features on items: ``codes[f, i]`` (−1 = undefined).

    ``values[f]`` maps a code back to the feature's value (``values[f][code]``).
    """

    names: list[str]
    codes: np.ndarray  # [n_features, n_items] int32
    values: list[list[Hashable]]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def row(self, name: str) -> np.ndarray:
        return self.codes[self.index(name)]

    def value(self, name: str, code: int) -> Hashable | None:
        return None if code < 0 else self.values[self.index(name)][code]


def build_table(features: Mapping[str, AnyFeature], items: Sequence[tuple[Tokens, int | None]],
                code_books: Mapping[str, dict] | None = None) -> FeatureTable:
    """Evaluate every feature on every (tokens, position) item.

    code_books: optional shared {feature: {value: code}} dicts so several tables use the same codes
    (they are extended in place with new values).
    """
    names = list(features)
    books = code_books if code_books is not None else {}
    codes = np.full((len(names), len(items)), -1, dtype=np.int32)
    for fi, name in enumerate(names):
        f = features[name]
        book = books.setdefault(name, {})
        for ii, (toks, pos) in enumerate(items):
            v = evaluate(f, toks, pos)
            if v is None:
                continue
            try:
                c = book.get(v)
            except TypeError:  # unhashable value: treat as undefined
                continue
            if c is None:
                c = book[v] = len(book)
            codes[fi, ii] = c
    values = [[v for v, _ in sorted(books[n].items(), key=lambda kv: kv[1])] for n in names]
    return FeatureTable(names, codes, values)


__all__ = ["Feature", "PositionalFeature", "AnyFeature", "evaluate", "token_at", "generic_features",
           "positional_features", "all_features", "reads_beyond", "kind_rank", "FeatureTable", "build_table",
           "RELATIVE_OFFSETS"]
