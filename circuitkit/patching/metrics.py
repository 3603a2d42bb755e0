"""Metrics read on the base input's answer position: logit difference, probability, KL, ...

A metric maps logits gathered at each example's answer position ``[n, vocab]`` plus a
``MetricContext`` to one value per example ``[n]``.  Batched sweeps stack ``k`` patched copies of
a batch of ``b`` examples (``n = k * b``); ``evaluate`` repeats the context to match.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks.base import Task


@dataclass
class MetricContext:
    """Where and what the answer is, per base example."""

    positions: Tensor  # [b] index where the answer is read
    answer: Tensor  # [b] correct token id
    wrong: Tensor | None = None  # [b] competitor token id (task's own, else the source's answer)
    clean_logprobs: Tensor | None = None  # [b, vocab] unpatched base log-probs at ``positions``
    target: str = ""

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device | str) -> MetricContext:
        """The same context with every tensor on ``device`` (where the logits it scores live)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MetricContext(mv(self.positions), mv(self.answer), mv(self.wrong), mv(self.clean_logprobs), self.target)


MetricFn = Callable[[Tensor, MetricContext], Tensor]


def _need_wrong(ctx: MetricContext, name: str) -> Tensor:
    if ctx.wrong is None:
        raise CircuitkitError(
            f"metric {name!r} needs a competing answer, but the task gives none for target {ctx.target!r}; "
            "pass a source input whose answer differs (interchange), or use logit, prob, kl, accuracy or loss"
        )
    return ctx.wrong


def _gather(x: Tensor, ids: Tensor) -> Tensor:
    return x.gather(-1, ids.to(x.device).unsqueeze(-1)).squeeze(-1)


def logit_diff(logits: Tensor, ctx: MetricContext) -> Tensor:
    """logit(answer) - logit(competitor)  [n]."""
    return _gather(logits, ctx.answer) - _gather(logits, _need_wrong(ctx, "logit_diff"))


def logit(logits: Tensor, ctx: MetricContext) -> Tensor:
    return _gather(logits, ctx.answer)


def prob(logits: Tensor, ctx: MetricContext) -> Tensor:
    return _gather(logits.softmax(-1), ctx.answer)


def loss(logits: Tensor, ctx: MetricContext) -> Tensor:
    """Cross-entropy of the answer (nats)."""
    return -_gather(logits.log_softmax(-1), ctx.answer)


def accuracy(logits: Tensor, ctx: MetricContext) -> Tensor:
    return (logits.argmax(-1) == ctx.answer.to(logits.device)).to(logits.dtype)


def kl(logits: Tensor, ctx: MetricContext) -> Tensor:
    """KL(clean || patched) of the next-token distribution at the answer position (nats)."""
    if ctx.clean_logprobs is None:
        raise CircuitkitError("metric 'kl' needs the clean (unpatched) distribution; build the context with it")
    lp = logits.log_softmax(-1)
    cl = ctx.clean_logprobs.to(lp.device)
    return (cl.exp() * (cl - lp)).sum(-1)


METRICS: dict[str, MetricFn] = {
    "logit_diff": logit_diff, "logit": logit, "prob": prob, "kl": kl, "accuracy": accuracy, "loss": loss,
}


def get_metric(name: str) -> MetricFn:
    if name not in METRICS:
        raise CircuitkitError(f"unknown metric {name!r}; valid: {choices_hint(METRICS)}")
    return METRICS[name]


def metric_context(task: Task, base_ids: Tensor, source_ids: Tensor | None = None, target: str | None = None,
                   clean_logits: Tensor | None = None) -> MetricContext:
    """Answer position/token per base example; ``wrong`` from the task, else from the source's answer.

    clean_logits: [b, pos, vocab] of the unpatched base run (for ``kl``).
    """
    name = target or task.default_target
    pos, ans, wrong = [], [], []
    src_rows = source_ids.tolist() if source_ids is not None else [None] * base_ids.shape[0]
    for row, srow in zip(base_ids.tolist(), src_rows):
        toks = task.tokenizer.id_tokens(row)
        try:
            t = task.target(toks, name)
        except (ValueError, IndexError) as e:
            raise CircuitkitError(f"input {task.decode(row)!r} has no answer for target {name!r}: {e}") from None
        pos.append(t.position)
        ans.append(t.token)
        w = t.wrong
        if w is None and srow is not None:
            try:
                w = task.target(task.tokenizer.id_tokens(srow), name).token
            except (CircuitkitError, ValueError, IndexError):
                w = None
        wrong.append(w)
    wrong_t = None if any(w is None for w in wrong) else torch.tensor(wrong)
    ctx = MetricContext(torch.tensor(pos), torch.tensor(ans), wrong_t, None, name)
    if clean_logits is not None:
        set_clean_logits(ctx, clean_logits)
    return ctx


def set_clean_logits(ctx: MetricContext, clean_logits: Tensor) -> None:
    """Record the unpatched base run's log-probabilities at the answer positions (what ``kl`` compares to);
    clean_logits [b, pos, vocab] (any length that covers the answer positions)."""
    ctx.clean_logprobs = at_positions(clean_logits, ctx.positions, 1).log_softmax(-1).detach()


def at_positions(logits: Tensor, positions: Tensor, copies: int) -> Tensor:
    """logits [copies*b, pos, vocab] -> [copies*b, vocab] at each example's answer position."""
    idx = positions.to(logits.device).repeat(copies)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]


def repeat_context(ctx: MetricContext, copies: int) -> MetricContext:
    rep = lambda t: None if t is None else t.repeat(copies, *([1] * (t.ndim - 1)))  # noqa: E731
    return MetricContext(rep(ctx.positions), rep(ctx.answer), rep(ctx.wrong), rep(ctx.clean_logprobs), ctx.target)


def evaluate(metric: str | MetricFn, logits: Tensor, ctx: MetricContext) -> Tensor:
    """Per-example metric of ``copies`` stacked patched runs: logits [copies*b, pos, vocab] -> [copies, b]."""
    fn = get_metric(metric) if isinstance(metric, str) else metric
    b = len(ctx)
    if logits.shape[0] % b:
        raise ValueError(f"logits batch {logits.shape[0]} is not a multiple of the context's {b} examples")
    copies = logits.shape[0] // b
    vals = fn(at_positions(logits, ctx.positions, copies), repeat_context(ctx, copies))
    return vals.reshape(copies, b)


