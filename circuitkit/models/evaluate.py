"""Held-out evaluation of probed models, the way the paper measures each task.

counting / any task read at one target: accuracy of the argmax at the target position;
addition (``generate`` tasks): exact match of the greedily decoded answer including EOS;
tasks with a competitor token (IOI): share of inputs preferring the answer, mean logit difference.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuitkit.models.runner import ModelRunner
from circuitkit.tasks.base import Task


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def greedy_complete(runner: ModelRunner, task: Task, ids: Tensor, prompt_len: Tensor) -> Tensor:
    """Greedy decoding: keep each row's first ``prompt_len`` tokens, generate the rest.

    ids: [batch, seq_len]; prompt_len: [batch].  Returns generated ids [batch, seq_len] where
    everything after a generated EOS is PAD.
    """
    out = ids.clone()
    pos = torch.arange(ids.shape[1], device=ids.device)
    out[pos.unsqueeze(0) >= prompt_len.unsqueeze(1)] = task.vocab.pad_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for p in range(int(prompt_len.min()), ids.shape[1]):
        logits = runner.logits(out[:, :p])[:, -1]
        nxt = logits.argmax(-1)
        gen = p >= prompt_len
        nxt = torch.where(done, torch.full_like(nxt, task.vocab.pad_id), nxt)
        out[:, p] = torch.where(gen, nxt, out[:, p])
        done |= gen & (nxt == task.vocab.eos_id)
    return out


def _answer_span_equal(task: Task, gen: Tensor, ref: Tensor, prompt_len: Tensor) -> Tensor:
    """Exact match of everything after the prompt up to and including EOS (then padding)."""
    pos = torch.arange(ref.shape[1])
    after = pos.unsqueeze(0) >= prompt_len.unsqueeze(1)
    return ((gen == ref) | ~after).all(dim=1)


@torch.no_grad()
def evaluate_texts(runner: ModelRunner, task: Task, texts: Sequence[str], batch_size: int = 2048,
                   progress: bool = False) -> dict:
    """Task metric(s) over ``texts`` with 95% Wilson intervals."""
    correct = 0
    n = 0
    prefer = 0
    ld_sum = 0.0
    has_wrong = False
    generate = getattr(task, "eval_mode", "targets") == "generate"
    dev = runner.device
    it = range(0, len(texts), batch_size)
    for start in tqdm(it, desc=f"eval {task.name}", disable=not progress, leave=False):
        chunk = list(texts[start : start + batch_size])
        ids = task.encode(chunk).to(dev)
        toks = [task.tokens(t) for t in chunk]
        if generate:
            plen = torch.tensor([task.prompt_length(t) for t in toks], device=dev)
            gen = greedy_complete(runner, task, ids, plen)
            correct += int(_answer_span_equal(task, gen.cpu(), ids.cpu(), plen.cpu()).sum())
        else:
            tg = [task.target(t) for t in toks]
            logits = runner.logits(ids)
            rows = torch.arange(len(chunk), device=dev)
            pos = torch.tensor([t.position for t in tg], device=dev)
            at = logits[rows, pos]  # [batch, vocab]
            ans = torch.tensor([t.token for t in tg], device=dev)
            correct += int((at.argmax(-1) == ans).sum())
            if tg[0].wrong is not None:
                has_wrong = True
                wrong = torch.tensor([t.wrong for t in tg], device=dev)
                ld = at[rows, ans] - at[rows, wrong]
                prefer += int((ld > 0).sum())
                ld_sum += float(ld.sum())
        n += len(chunk)
    lo, hi = wilson_interval(correct, n)
    out = {"n": n, "accuracy": correct / max(n, 1), "accuracy_ci95": [lo, hi],
           "metric": "exact_match_greedy" if generate else "argmax_at_target"}
    if has_wrong:
        out["prefers_answer"] = prefer / n
        out["prefers_answer_ci95"] = list(wilson_interval(prefer, n))
        out["mean_logit_diff"] = ld_sum / n
    return out


def evaluate_model(runner: ModelRunner, task: Task, split: str = "test", limit: int | None = 20000,
                   seed: int = 0, progress: bool = False) -> dict:
    """Evaluate on (a seeded random subset of ``limit`` examples of) a split; ``limit=None`` = all."""
    texts = task.split(split)
    if limit is not None and limit < len(texts):
        idx = random.Random(seed).sample(range(len(texts)), limit)
        texts = [texts[i] for i in idx]
    res = evaluate_texts(runner, task, texts, progress=progress)
    res["split"] = split
    res["split_size"] = len(task.split(split))
    return res
