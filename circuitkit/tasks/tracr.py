"""The task of a tracr-compiled model, read from data its directory holds (``task.json``), never from code.

``circuitkit model from-tracr`` writes ``task.json`` beside the converted weights: the input vocabulary (tracr's
input encoding, with its BOS and pad tokens), the output vocabulary (one token per output unit, ``d_vocab_out``),
the length range, and the RASP program's answer for every input it was checked on (all inputs up to
``max_seq_len``, or the seeded sample of 10,000), with the value of every RASP variable at every position.  A
checkpoint's ``circuitkit.json`` names it with the spec ``tracr:`` ("the task recorded in the model's own
directory"), so ``run``, ``patch`` and ``verify`` need no ``--task``; ``tracr:DIR`` names another directory.

An input is ``BOS t1 t2 ... tn`` (space-separated tokens, right-padded with the pad token).  Its named
positions are ``BOS`` and ``x1`` .. ``xn``; the answer ``yk`` is read at ``xk`` (a compiled model reads its
output at every input position, bidirectionally).  Answers are indices into the *output* vocabulary, which is
what the model's logits range over; a numerical program's (``frac_prevs``) are the values it outputs, read
through the nearest-value readout ``models/from_tracr.py`` builds (a logit difference there is a scaled
output-value difference).  Features: ``length`` (of the whole input: a bidirectional model sees it
all), and one positional feature per RASP variable (its value at the site's position; ``tokens`` and
``indices`` are tracr's primitives), so hypotheses name what the program computes there.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Hashable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks.base import Target, Task, Tokenizer, Tokens, Vocabulary
from circuitkit.tasks.features import Feature, PositionalFeature

PREFIX = "tracr:"
TASK_FILE = "task.json"
FORMAT = "circuitkit.tracr_task/1"
#: the spec keys ``task.json`` must hold
REQUIRED = ("format", "name", "output", "input_tokens", "bos", "pad", "output_tokens", "min_len", "max_len",
            "answers")
NUMERICAL_UNREAD = ("a numerical output (one value per position, e.g. frac_prevs) is read through its nearest-value "
                    "readout, which this task file does not record; convert the program again with 'circuitkit model "
                    "from-tracr'")


class SpaceTokenizer(Tokenizer):
    """Whitespace-separated tokens (tracr's tokens are arbitrary strings: ``BOS``, ``compiler_pad``, ``3``)."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab

    def split(self, text: str) -> list[str]:
        toks = text.split()
        bad = sorted({t for t in toks if t not in self.vocab.tokens})
        if bad:
            raise CircuitkitError(f"tokens {bad[:10]} are not in the vocabulary; valid tokens: "
                                  f"{choices_hint(self.vocab.tokens)} (separated by spaces)")
        return toks

    def join(self, tokens: Sequence[str]) -> str:
        return " ".join(tokens)


def task_dir(spec: str, base_dir: str | Path | None, model_dir: str | Path | None) -> Path:
    """The directory a ``tracr:`` spec names: ``tracr:DIR`` (relative to ``base_dir``), or ``tracr:`` = the model's."""
    rest = spec[len(PREFIX):].strip()
    if not rest:
        if model_dir is None:
            raise CircuitkitError(f"task {spec!r} is the task recorded in the model's own directory: name it where a "
                                  "model is loaded (a case whose [model] path is set, or --task on a verb given a "
                                  "model), or write tracr:DIR")
        return Path(model_dir)
    path = Path(rest).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def _check_spec(data: Any, where: str) -> None:
    """Refuse a ``task.json`` that is not a tracr task spec, naming what is wrong."""
    if not isinstance(data, dict):
        raise CircuitkitError(f"{where} does not hold a JSON object (a tracr task spec)")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CircuitkitError(f"{where} lacks {', '.join(missing)}; rewrite it with 'circuitkit model from-tracr'")
    if data["format"] != FORMAT:
        raise CircuitkitError(f"{where} has format {data['format']!r}; this circuitkit reads {FORMAT!r}")
    if data["output"] == "numerical" and "readout" not in data:
        raise CircuitkitError(f"{where}: {NUMERICAL_UNREAD}")
    if data["output"] not in ("categorical", "numerical"):
        raise CircuitkitError(f"{where}: output {data['output']!r} is not one of categorical, numerical")
    toks = data["input_tokens"]
    if not (isinstance(toks, list) and toks and all(isinstance(t, str) and t and not any(c.isspace() for c in t)
                                                    for t in toks)):
        raise CircuitkitError(f"{where}: input_tokens must be a list of non-empty strings without spaces")
    for key in ("bos", "pad"):
        if data[key] not in toks:
            raise CircuitkitError(f"{where}: {key} {data[key]!r} is not one of input_tokens {toks}")
    lo, hi = data["min_len"], data["max_len"]
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise CircuitkitError(f"{where}: min_len and max_len must be integers with 1 <= min_len <= max_len")
    if not isinstance(data["answers"], dict) or not data["answers"]:
        raise CircuitkitError(f"{where}: answers must be a non-empty table input -> answer per position")


class TracrTask(Task):
    """The task a tracr-compiled model solves, from its directory's ``task.json`` (see the module docstring)."""

    default_target = "y1"
    format_hint = "BOS and then the program's input tokens, separated by spaces"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        file = self.directory / TASK_FILE
        if not file.is_file():
            raise CircuitkitError(f"{str(self.directory)!r} holds no {TASK_FILE} (a tracr task spec); convert the "
                                  "program with 'circuitkit model from-tracr FILE.py:NAME --out DIR'")
        raw = file.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CircuitkitError(f"{str(file)!r} is not valid JSON ({e}); rewrite it with 'circuitkit model "
                                  "from-tracr'") from None
        _check_spec(data, repr(str(file)))
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.data = data
        self.name = str(data["name"])
        self.spec = f"{PREFIX}{self.directory}"
        self.min_len, self.max_len = int(data["min_len"]), int(data["max_len"])
        self.seq_len = self.max_len + 1
        self.tokenizer = SpaceTokenizer(Vocabulary(tuple(data["input_tokens"]), data["bos"], data["pad"], data["pad"]))
        self.output_tokens: tuple[str, ...] = tuple(str(t) for t in data["output_tokens"])
        self.position_names = ("BOS", *(f"x{k}" for k in range(1, self.max_len + 1)))
        self.exhaustive = bool(data.get("exhaustive", False))
        self._answers: dict[str, list[int]] = {}
        for key, ans in data["answers"].items():
            self._answers[str(key)] = self._checked_answer(str(key), ans, file)
        self._inputs = tuple(sorted(self._answers, key=lambda k: (len(k.split()), k)))
        self.variables: dict[str, dict[str, list]] = {str(k): v for k, v in data.get("variables", {}).items()}

    def _checked_answer(self, key: str, ans: Any, file: Path) -> list[int]:
        toks = key.split()
        n_out = len(self.output_tokens)
        if not self.min_len <= len(toks) <= self.max_len or any(t in (self.vocab.bos, self.vocab.pad) or
                                                                t not in self.vocab.tokens for t in toks):
            raise CircuitkitError(f"{str(file)!r}: answer table key {key!r} is not an input of "
                                  f"{self.min_len}-{self.max_len} program tokens")
        if not (isinstance(ans, list) and len(ans) == len(toks) and all(
                isinstance(a, int) and not isinstance(a, bool) and 0 <= a < n_out for a in ans)):
            raise CircuitkitError(f"{str(file)!r}: the answer of {key!r} must be {len(toks)} indices into the "
                                  f"{n_out} output tokens, got {ans!r}")
        return ans

    # ---- the answer table --------------------------------------------------------------------
    def _key(self, tokens: Tokens) -> str:
        """The table key of an input's tokens (BOS and padding stripped), or an error saying what is wrong."""
        toks = list(tokens)
        while toks and toks[-1] == self.vocab.pad:
            toks.pop()
        if not toks or toks[0] != self.vocab.bos:
            raise CircuitkitError(f"a {self.name} input starts with the BOS token {self.vocab.bos!r}")
        body = toks[1:]
        bad = [t for t in body if t in (self.vocab.bos, self.vocab.pad)]
        if bad:
            raise CircuitkitError(f"{bad[0]!r} may appear only {'first' if bad[0] == self.vocab.bos else 'at the end'}")
        if not self.min_len <= len(body) <= self.max_len:
            raise CircuitkitError(f"it has {len(body)} program tokens; this model takes {self.min_len}-{self.max_len}")
        return " ".join(body)

    def lookup(self, tokens: Tokens) -> list[int]:
        """The program's answer (output-vocabulary indices, one per input token) from the table; an input the
        table lacks is an error naming what the table holds."""
        key = self._key(tokens)
        ans = self._answers.get(key)
        if ans is None:
            held = ("every input" if self.exhaustive else f"a sample of {len(self._answers)} inputs")
            raise CircuitkitError(f"the answer table of {self.name} has no entry for {self.text(key.split())!r}: it holds "
                                  f"the program's answers on {held} of {self.min_len}-{self.max_len} tokens over "
                                  f"{choices_hint(self.program_tokens)}, e.g. {self.example()!r}")
        return ans

    @cached_property
    def program_tokens(self) -> tuple[str, ...]:
        """The program's own input tokens (the vocabulary without BOS and pad)."""
        return tuple(t for t in self.vocab.tokens if t not in (self.vocab.bos, self.vocab.pad))

    def text(self, body: Sequence[str]) -> str:
        """The input text of the program tokens ``body`` (BOS first)."""
        return " ".join((self.vocab.bos, *body))

    def answer_text(self, index: int) -> str:
        """The output token an answer index stands for."""
        return self.output_tokens[index]

    # ---- the Task API ------------------------------------------------------------------------
    def generate(self, rng: random.Random, n: int) -> list[str]:
        """``n`` inputs drawn uniformly from the answer table."""
        return [self.text(rng.choice(self._inputs).split()) for _ in range(n)]

    def split(self, which: str) -> Sequence[str]:
        """A compiled program is not trained: both splits are every input of the answer table."""
        self.check_split_name(which)
        return tuple(self.text(k.split()) for k in self._inputs)

    def example(self) -> str:
        return self.text(self._inputs[-1].split())

    def positions(self, tokens: Tokens) -> dict[str, int]:
        n = len(self._key(tokens).split())
        return {"BOS": 0, **{f"x{k}": k for k in range(1, n + 1)}}

    def targets(self, tokens: Tokens) -> list[Target]:
        return [Target(f"y{k}", k, a) for k, a in enumerate(self.lookup(tokens), start=1)]

    def answers(self, tokens: Tokens) -> dict[str, int] | None:
        """The program's answers on any input the table holds (the causal model's answer function)."""
        return {t.name: t.token for t in self.targets(tokens)}

    def format_problem(self, tokens: Tokens) -> str | None:
        try:
            self.lookup(tokens)
        except CircuitkitError as e:
            return str(e)
        return None

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        """One token changed (same length) so that the answer at the default target changes, else any answer (F)."""
        toks = self.tokens(text, pad=False)
        body, ans = toks[1:], self.lookup(toks)
        edits: list[tuple[bool, str]] = []
        for i, old in enumerate(body):
            for new in self.program_tokens:
                if new == old:
                    continue
                cand = [*body[:i], new, *body[i + 1:]]
                other = self._answers.get(" ".join(cand))
                if other is not None and other != ans:
                    edits.append((other[0] != ans[0], self.text(cand)))
        best = [t for first, t in edits if first] or [t for _, t in edits]
        if not best:
            raise CircuitkitError(f"no one-token edit of {text!r} changes the program's answer")
        return rng.choice(best)

    def task_features(self) -> list[Feature]:
        feats: list[Any] = [Feature("length", lambda t: len(self._key(t).split()),
                                    "the number of program tokens (the whole input: attention is bidirectional)")]
        coarse = self.token_maps
        for name in self.variables:
            feats.append(PositionalFeature(name, lambda t, p, name=name: self.variable(name, t, p),
                                           f"the RASP variable {name} at the position" +
                                           (" (a function of the token there)" if name in coarse else ""),
                                           reads=(0,) if name == "tokens" or name in coarse else (),
                                           coarse=name in coarse))
        return feats

    @cached_property
    def token_maps(self) -> frozenset[str]:
        """The RASP variables that are a function of the token at their own position on every input of the table
        (tracr's ``Map`` of ``tokens``, e.g. ``tokens == 'x'``) and take more than one value: the causal model
        sets them by a token edit (``PositionalFeature.coarse``)."""
        tokens = self.variables.get("tokens", {})
        out = set()
        for name, table in self.variables.items():
            if name in ("tokens", "indices"):
                continue
            seen: dict[Hashable, Hashable] = {}
            ok = bool(table)
            for key, values in table.items():
                toks = tokens.get(key, key.split())
                for tok, v in zip(toks, values, strict=False):
                    v = tuple(v) if isinstance(v, list) else v
                    if seen.setdefault(tok, v) != v:
                        ok = False
                        break
                if not ok:
                    break
            if ok and len(set(seen.values())) > 1:
                out.add(name)
        return frozenset(out)

    def variable(self, name: str, tokens: Tokens, position: int) -> Hashable | None:
        """The value of RASP variable ``name`` at ``position`` of an input (None: BOS, padding, or not in the table)."""
        try:
            values = self.variables[name].get(self._key(tokens))
        except CircuitkitError:
            return None
        if values is None or not 1 <= position <= len(values):
            return None
        v = values[position - 1]
        return tuple(v) if isinstance(v, list) else v

    def describe(self) -> dict:
        return {**super().describe(), "output_tokens": list(self.output_tokens), "task_sha256": self.sha256,
                "directory": str(self.directory)}


def spec_sha256(directory: str | Path) -> str:
    """The sha256 of a directory's ``task.json`` (what an artefact records to know the task again)."""
    file = Path(directory) / TASK_FILE
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError as e:
        raise CircuitkitError(f"cannot read {str(file)!r}: {e}") from None


__all__ = ["FORMAT", "NUMERICAL_UNREAD", "PREFIX", "TASK_FILE", "SpaceTokenizer", "TracrTask", "spec_sha256",
           "task_dir"]
