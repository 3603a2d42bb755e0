"""A task made of your own prompt pairs: one JSONL row per example, tokenized by the model's own Hugging
Face tokenizer (local files only), so sweeps, path patching and verification run on your data with no code.

Each row::

    {"prompt": "When [IO:Mary] and [S:John] went to the shop, [S2:John] gave a book to",
     "answer": " Mary",
     "counterfactual": "When [IO:Mary] and [S:John] went to the shop, [S2:Mary] gave a book to",
     "counterfactual_answer": " John"}

``[NAME:text]`` marks a span: the text is kept, and the position ``NAME`` is the span's last token.  Every
prompt also gets ``END`` (its last token, where the answer is read).  Each span is a feature (its text),
``answer`` is a feature, and the counterfactual is the minimal contrast (the paper's contrast F).  The
name ``prompt_pairs:FILE.jsonl`` selects this task wherever a task is named; the tokenizer comes from
the model's directory (or ``--tokenizer``-style ``tokenizer_dir``).
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from circuitkit.errors import CircuitkitError
from circuitkit.tasks.base import Feature, Target, Task, Tokens

PREFIX = "prompt_pairs:"
SPAN = re.compile(r"\[([A-Za-z_][A-Za-z0-9_]*):([^\[\]]+)\]")
ROW_KEYS = ("prompt", "answer", "counterfactual", "counterfactual_answer")
RESERVED = ("BOS", "END", "ANS")
TEST_SHARE = 0.2


@dataclass(frozen=True)
class _Example:
    """One prompt as circuitkit sees it: its complete text, named positions, span values and answers."""

    text: str
    positions: dict[str, int]
    spans: dict[str, str]
    answer: int
    wrong: int
    partner: str  # the text of the other prompt of the pair


def _strip_spans(marked: str) -> tuple[str, dict[str, tuple[int, int, str]]]:
    """The prompt without markers, and each span's (start, end) character range and text."""
    out, spans, last = [], {}, 0
    for m in SPAN.finditer(marked):
        out.append(marked[last:m.start()])
        start = sum(len(x) for x in out)
        name, text = m.group(1), m.group(2)
        if name in spans or name in RESERVED:
            raise ValueError(f"span name {name!r} is {'reserved' if name in RESERVED else 'used twice'}")
        spans[name] = (start, start + len(text), text)
        out.append(text)
        last = m.end()
    out.append(marked[last:])
    clean = "".join(out)
    if "[" in clean or "]" in clean:
        raise ValueError("a '[' or ']' is not part of a [NAME:text] span")
    return clean, spans


class PromptPairsTask(Task):
    """Prompt pairs from a JSONL file (see the module docstring)."""

    default_target = "answer"
    format_hint = "one of the prompts of the JSONL file followed by its answer"

    def __init__(self, path: str | Path, tokenizer_dir: str | Path) -> None:
        from circuitkit.tasks.ioi import load_gpt2_tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise CircuitkitError(f"prompt-pairs file {str(self.path)!r} does not exist")
        self.tokenizer = load_gpt2_tokenizer(tokenizer_dir)
        self.name = f"prompt_pairs({self.path.name})"
        self.spec = f"{PREFIX}{self.path.resolve()}"
        self._rows = self._read_rows()
        self._examples: dict[str, _Example] = {}
        pairs: list[tuple[str, str]] = []
        names: list[str] = []
        for i, row in enumerate(self._rows):
            try:
                a = self._example(row["prompt"], row["answer"], row["counterfactual_answer"])
                b = self._example(row["counterfactual"], row["counterfactual_answer"], row["answer"])
            except (ValueError, CircuitkitError) as e:
                raise CircuitkitError(f"{self.path.name} row {i + 1}: {e}") from None
            if set(a.spans) != set(b.spans):
                raise CircuitkitError(f"{self.path.name} row {i + 1}: the prompt and the counterfactual mark "
                                      f"different spans ({sorted(a.spans)} vs {sorted(b.spans)})")
            for ex, which in ((a, "prompt"), (b, "counterfactual")):
                if ex.text in self._examples:
                    raise CircuitkitError(f"{self.path.name} row {i + 1}: its {which} (with its answer) repeats one "
                                          "of an earlier row; every prompt must be distinct")
            a, b = replace(a, partner=b.text), replace(b, partner=a.text)
            self._examples[a.text], self._examples[b.text] = a, b
            pairs.append((a.text, b.text))
            names += [n for n in a.spans if n not in names]
        self.span_names = tuple(names)
        self.position_names = ("BOS", *self.span_names, "END")
        self.seq_len = max(len(self.tokenizer.split(t)) for t in self._examples)
        order = list(range(len(pairs)))
        random.Random(0).shuffle(order)
        n_test = max(1, round(TEST_SHARE * len(order)))
        self._split = {"test": tuple(t for i in order[:n_test] for t in pairs[i]),
                       "train": tuple(t for i in order[n_test:] for t in pairs[i])}

    # ---- reading -----------------------------------------------------------------------------
    def _read_rows(self) -> list[dict]:
        rows = []
        from circuitkit.validate import read_text

        for i, line in enumerate(read_text(self.path, "prompt-pairs file").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CircuitkitError(f"{self.path.name} line {i + 1} is not JSON: {e}") from None
            missing = [k for k in ROW_KEYS if not isinstance(row.get(k), str) or not row[k]] if isinstance(
                row, dict) else list(ROW_KEYS)
            if missing:
                raise CircuitkitError(f"{self.path.name} line {i + 1}: missing or empty {', '.join(missing)}; a row "
                                      f"holds the strings {', '.join(ROW_KEYS)}")
            rows.append(row)
        if len(rows) < 10:
            raise CircuitkitError(f"{self.path.name} holds {len(rows)} rows; at least 10 are needed for a train/test "
                                  "split and fair interchange sources")
        return rows

    def _example(self, marked: str, answer: str, wrong: str) -> _Example:
        clean, spans = _strip_spans(marked)
        bos = self.vocab.bos
        enc = self.tokenizer.hf(clean, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        positions = {"BOS": 0, "END": len(offsets)}
        for name, (start, end, _) in spans.items():
            last = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
            if not last:
                raise ValueError(f"span {name!r} covers no token")
            positions[name] = last[-1] + 1  # +1: BOS comes first
        answer_ids = self.tokenizer.hf(answer, add_special_tokens=False)["input_ids"]
        wrong_ids = self.tokenizer.hf(wrong, add_special_tokens=False)["input_ids"]
        if not answer_ids or not wrong_ids:
            raise ValueError("an answer tokenizes to nothing")
        if answer_ids[0] == wrong_ids[0]:
            raise ValueError(f"the answer {answer!r} and the counterfactual answer {wrong!r} start with the same "
                             "token, so no logit difference can tell them apart")
        convert = self.tokenizer.hf.convert_ids_to_tokens
        text = bos + clean + self.tokenizer.join(convert(answer_ids[:1]))
        if self.tokenizer.split(text) != [bos, *convert(enc["input_ids"]), *convert(answer_ids[:1])]:
            raise ValueError(f"the prompt and its answer {answer!r} tokenize differently together than apart")
        return _Example(text, positions, {n: v[2] for n, v in spans.items()}, answer_ids[0], wrong_ids[0], "")

    # ---- the Task API ------------------------------------------------------------------------
    def lookup(self, tokens: Tokens) -> _Example:
        toks = list(tokens)
        while toks and toks[-1] == self.vocab.pad and len(toks) > 1:
            toks.pop()
        text = self.tokenizer.join(toks)
        ex = self._examples.get(text)
        if ex is None:
            raise CircuitkitError(f"{text!r} is not one of the prompts of {self.path.name}")
        return ex

    def generate(self, rng: random.Random, n: int) -> list[str]:
        texts = list(self._examples)
        return [rng.choice(texts) for _ in range(n)]

    def split(self, which: str) -> Sequence[str]:
        self.check_split_name(which)
        return self._split[which]

    def positions(self, tokens: Tokens) -> dict[str, int]:
        return dict(self.lookup(tokens).positions)

    def targets(self, tokens: Tokens) -> list[Target]:
        ex = self.lookup(tokens)
        return [Target("answer", ex.positions["END"], ex.answer, ex.wrong)]

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        return self.lookup(self.tokens(text)).partner

    def format_problem(self, tokens: Tokens) -> str | None:
        try:
            self.lookup(tokens)
        except CircuitkitError as e:
            return str(e)
        return None

    def task_features(self) -> list[Feature]:
        def span(name: str):
            def value(toks: Tokens) -> str | None:
                try:
                    return self.lookup(toks).spans.get(name)
                except CircuitkitError:
                    return None
            return value

        def answer(toks: Tokens) -> int | None:
            try:
                return self.lookup(toks).answer
            except CircuitkitError:
                return None

        return [Feature(n, span(n), f"the text of span {n}") for n in self.span_names] + [
            Feature("answer", answer, "the answer's first token")]

    def describe(self) -> dict:
        return {**super().describe(), "vocab": None, "vocab_size": len(self.vocab), "path": str(self.path.resolve())}


__all__ = ["PromptPairsTask", "PREFIX"]
