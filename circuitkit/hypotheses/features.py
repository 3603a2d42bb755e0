"""Generic features every task gets for free: tokens at absolute positions, length, token counts."""
from __future__ import annotations

from typing import TYPE_CHECKING

from circuitkit.tasks.base import Feature, Tokens

if TYPE_CHECKING:
    from circuitkit.tasks.base import Task


def _length(task: "Task"):
    specials = {task.vocab.bos, task.vocab.eos, task.vocab.pad}
    return lambda t: sum(1 for x in t if x not in specials)


def generic_features(task: "Task") -> list[Feature]:
    """Token at each absolute position, input length, and the count of each non-special token."""
    feats = [Feature("length", _length(task), "number of non-special tokens")]
    for k in range(task.seq_len):
        feats.append(Feature(f"tok@{k}", lambda t, k=k: t[k], f"the token at absolute position {k}"))
    specials = {task.vocab.bos, task.vocab.eos, task.vocab.pad}
    if len(task.vocab) <= 64:  # counting a token is only meaningful for small symbolic vocabularies
        for tok in task.vocab.tokens:
            if tok not in specials:
                feats.append(Feature(f"count({tok})", lambda t, tok=tok: list(t).count(tok), f"occurrences of {tok!r}"))
    return feats


def token_at(tokens: Tokens, k: int) -> str | None:
    """The token at index k, or None when out of range."""
    return tokens[k] if -len(tokens) <= k < len(tokens) else None
