"""The task's causal model: what an interchange on some variables predicts (causal abstraction, Geiger et al.).

The prediction for a base/source pair is the task's answer on the base with the tested variables set to the
source's values and everything else left as it is.  The generic causal model does this for *token-level*
variables, those that are the token at some position (``tok@k``, ``tok@p-1``, a task feature declaring
``Feature.reads``, such as an index variable naming which earlier token is copied): copy those tokens from
the source into the base, then ask the task for the answers of the edited input (``Task.answers``).  A *coarse*
token-level variable (``PositionalFeature.coarse``: a function of the tokens it reads, such as tracr's
``tokens == 'x'``) is set by every choice of those tokens that gives it the source's value; the prediction is
their common answer, and there is none where they disagree (the answer then needs more of the tokens than the
variable holds).  It is exact where it applies, so an index or position variable is testable although no small function g(f, D) of
other features gives the answer (``verification/answers.py``, the data-driven fallback, which the verifier
uses for every other variable and says so).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from circuitkit.errors import CircuitkitError
from circuitkit.hypotheses.features import AnyFeature, PositionalFeature, evaluate
from circuitkit.tasks.base import Feature, Task, Tokens
from circuitkit.verification.answers import AnswerModel

#: how a prediction was made, as verification JSONs and reports name it
TOKEN_EDIT = "causal model: token edit"
DATA_DRIVEN = AnswerModel.method


def answers_any_input(task: Task) -> bool:
    """Whether the task implements ``Task.answers`` (the causal model's answer function)."""
    return type(task).answers is not Task.answers


def edit_positions(feature: AnyFeature, tokens: Tokens, site_position: int, task: Task) -> list[int] | None:
    """Indices of the tokens that ``feature`` is on this input (None: not a token-level variable here)."""
    if isinstance(feature, PositionalFeature):
        return [site_position + k for k in feature.reads] if feature.reads else None
    if isinstance(feature, Feature) and feature.reads:
        out = []
        for r in feature.reads:
            try:
                out.append(task.resolve_position(r, tokens))
            except CircuitkitError:
                return None
        return out
    return None


def token_editable(task: Task, features: Mapping[str, AnyFeature], names: Sequence[str]) -> bool:
    """Whether the generic causal model applies to ``names``: the task answers any input and every name is a
    token-level variable."""
    return answers_any_input(task) and all(
        isinstance(features.get(n), PositionalFeature | Feature) and bool(getattr(features[n], "reads", ()))
        for n in names)


#: most edits a coarse variable may need (its tokens' choices that give the source's value); more: no prediction
MAX_REALISATIONS = 256


def realisations(task: Task, features: Mapping[str, AnyFeature], names: Sequence[str], base: Tokens,
                 source: Tokens, site_position: int) -> list[list[str]] | None:
    """Every edit of the base that gives ``names`` the source's values (same layout assumed): the tokens a name
    reads copied from the source, or for a coarse name every choice of them that gives the source's value.  None
    when a variable has no position on either input, the two differ in length, or nothing (or too much) realises
    it."""
    if len(base) != len(source):
        return None
    edits = [list(base)]
    for n in names:
        f = features[n]
        pos = edit_positions(f, base, site_position, task)
        if pos is None or pos != edit_positions(f, source, site_position, task) or \
                any(not 0 <= k < len(base) for k in pos):
            return None
        if not getattr(f, "coarse", False):
            for e in edits:
                for k in pos:
                    e[k] = source[k]
            continue
        want = evaluate(f, source, site_position)
        if want is None:
            return None
        choices = [t for t in task.vocab.tokens if t not in (task.vocab.bos, task.vocab.pad, task.vocab.eos)]
        grown = []
        for e in edits:
            for toks in itertools.product(choices, repeat=len(pos)):
                cand = list(e)
                for k, t in zip(pos, toks, strict=True):
                    cand[k] = t
                if evaluate(f, cand, site_position) == want:
                    grown.append(cand)
            if len(grown) > MAX_REALISATIONS:
                return None
        if not grown:
            return None
        edits = grown
    return edits


def edited_answers(task: Task, features: Mapping[str, AnyFeature], names: Sequence[str], base: Tokens,
                   source: Tokens, site_position: int) -> dict[str, int] | None:
    """The task's answers on the base with ``names`` set to the source's values: per answer, the one value every
    realisation gives (answers where they disagree are left out); None when there is no realisation."""
    edits = realisations(task, features, names, base, source, site_position)
    if edits is None:
        return None
    answered = [a for a in (answers_of(task, e) for e in edits) if a is not None]
    if len(answered) < len(edits) or not answered:
        return None
    return {t: v for t, v in answered[0].items() if all(a.get(t) == v for a in answered[1:])}


def answers_of(task: Task, tokens: Tokens) -> dict[str, int] | None:
    """``Task.answers`` with the failures of an input the task cannot answer read as None."""
    try:
        return task.answers(tokens)
    except (CircuitkitError, IndexError, KeyError, ValueError):
        return None


@dataclass
class TokenEditPrediction:
    """answer(target) = the task's answer on the base with ``features`` copied from the source."""

    target: str
    features: tuple[str, ...]
    relevance: float  # share of sampled aligned pairs whose answer the edit changes
    task: Task = field(repr=False)
    table: Mapping[str, AnyFeature] = field(repr=False)
    method: str = TOKEN_EDIT
    context: tuple[str, ...] = ()

    def predict_pair(self, base: Tokens, source: Tokens, site_position: int) -> int | None:
        answers = edited_answers(self.task, self.table, self.features, base, source, site_position)
        return None if answers is None else answers.get(self.target)

    def describe(self) -> str:
        return f"{self.target} = answer(base with {', '.join(self.features)} from the source)"

    def to_dict(self) -> dict:
        return {"target": self.target, "features": list(self.features), "context": [], "purity": 1.0,
                "context_purity": round(1 - self.relevance, 4), "method": self.method,
                "relevance": round(self.relevance, 4)}


def fit_token_edit(task: Task, table: Mapping[str, AnyFeature], features: Sequence[str], target: str,
                   pairs: Iterable[tuple[Tokens, Tokens, int]]) -> TokenEditPrediction | None:
    """The token-edit prediction for ``target``, with ``relevance`` = how often the edit moves that answer on
    ``pairs`` (base tokens, source tokens, the site's index in the base): the fair pairs the tests draw from, so
    that the variables are judged under the same held-fixed context (IOI's S is set among the base's own two
    names).  The caller treats relevance < ``min_relevance`` as "the variables do not matter for it"; None when
    fewer than 20 pairs could be edited and answered (no verdict: fall back to the data-driven model)."""
    changed = total = 0
    for base, source, position in pairs:
        base_ans = answers_of(task, base)
        new_ans = edited_answers(task, table, features, base, source, position)
        if not base_ans or not new_ans or target not in base_ans or target not in new_ans:
            continue
        total += 1
        changed += int(base_ans[target] != new_ans[target])
    if total < 20:
        return None
    return TokenEditPrediction(target, tuple(features), changed / total, task, table)


__all__ = ["TOKEN_EDIT", "DATA_DRIVEN", "TokenEditPrediction", "answers_any_input", "edit_positions",
           "edited_answers", "fit_token_edit", "realisations", "token_editable"]
