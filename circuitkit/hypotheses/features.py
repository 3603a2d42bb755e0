"""Features of inputs as hypotheses use them: what a hypothesis says an activation site carries.

The vocabulary (``Feature``, ``PositionalFeature``, the generic features) lives in ``tasks/features.py`` and is
re-exported here.  Two kinds of feature:

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
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# the feature vocabulary itself lives with tasks; hypotheses re-export it for their callers
from circuitkit.tasks.features import (
    RELATIVE_OFFSETS,
    AnyFeature,
    Feature,
    PositionalFeature,
    Tokens,
    all_features,
    evaluate,
    generic_features,
    positional_features,
    token_at,
)

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
