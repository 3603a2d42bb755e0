"""The feature vocabulary of tasks: named functions of an input that hypotheses are about and that a
task's causal model sets (``Feature.reads``).

* ``Feature``: a function of the input's token list (``count(query)``, ``F2``, ``carry(2)``, ``tok@3``).
* ``PositionalFeature``: a function of the token list *and a position*: where the site was read (a query) or
  where a preimage sample matched it.  ``tok@p-1`` is "the token just before the matched position".

Generic features come free for every task (``generic_features``, ``positional_features``); tasks add their
own in ``Task.task_features``.  This module imports nothing from the rest of circuitkit at run time, so
``tasks/base.py`` and ``hypotheses/`` both build on it without an import circle.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from circuitkit.tasks.base import Task

#: a token list, as tasks split inputs
Tokens = Sequence[str]


@dataclass(frozen=True)
class Feature:
    """A named function of an input's token list; ``None`` means "undefined for this input".

    ``reads`` names the positions (named or indices) of the tokens the feature *is*, for a token-level
    variable (``F2`` is the token at ``F2``; an index variable is the token that names the index): the
    generic causal model sets it to a source's value by copying those tokens (``verification/causal.py``)."""

    name: str
    fn: Callable[[Tokens], Hashable | None] = field(compare=False)
    description: str = ""
    reads: tuple[str | int, ...] = ()

    def __call__(self, tokens: Tokens) -> Hashable | None:
        try:
            return self.fn(tokens)
        except (IndexError, ValueError, KeyError):
            return None


#: relative offsets of the generic ``tok@p±k`` features (causal models read only p and before)
RELATIVE_OFFSETS = (0, -1, -2, -3)
#: equality features ``eq@i,j`` are generated for sequences at most this long (O(n²) of them)
MAX_EQ_SEQ_LEN = 16


@dataclass(frozen=True)
class PositionalFeature:
    """A named function of (tokens, position); ``None`` means undefined.  ``reads``: offsets from the position
    of the tokens the feature *is* (``tok@p-1``: (-1,)), for the generic causal model (``Feature.reads``);
    ``coarse``: the feature is a function of those tokens, not the tokens themselves (tracr's ``map_3`` =
    ``tokens == 'x'``), so the causal model sets it with any tokens that give the source's value."""

    name: str
    fn: Callable[[Tokens, int], Hashable | None] = field(compare=False)
    description: str = ""
    reads: tuple[int, ...] = ()
    coarse: bool = False

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


__all__ = ["Feature", "PositionalFeature", "AnyFeature", "Tokens", "evaluate", "token_at", "generic_features",
           "positional_features", "all_features", "RELATIVE_OFFSETS", "MAX_EQ_SEQ_LEN"]
