"""The Task API: everything circuitkit needs to know about a task, implemented in one file.

A task defines its vocabulary and tokenizer, how inputs are generated and split, which
positions have names (``:``, ``A1``, ``END`` ...), where answers are read (``Target``), how
contrast inputs are made, and named features of an input.  Inputs are plain strings; all
position and feature logic works on the list of token strings (``Task.tokens``), so the same
feature code runs on decoder samples that need not be well-formed (features return ``None``).
"""
from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks.features import Feature, Tokens

LAYOUT = "layout"
"""In ``Task.holds_fixed`` / ``fair_sources``: hold the base's layout fixed (``Task.layout``)."""

CONTRASTS = ("random", "minimal")
"""The paper's two ways to make a source from a base (``Task.contrast``): R, another example whose answer
differs, and F, a minimal edit that changes the answer."""


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of token strings; the index of a token is its id."""

    tokens: tuple[str, ...]
    bos: str
    eos: str
    pad: str

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        try:
            return self._index[token]  # type: ignore[attr-defined]
        except KeyError:
            raise CircuitkitError(
                f"token {token!r} is not in the vocabulary; valid tokens: {choices_hint(self.tokens)}"
            ) from None

    @property
    def bos_id(self) -> int:
        return self.id_of(self.bos)

    @property
    def eos_id(self) -> int:
        return self.id_of(self.eos)

    @property
    def pad_id(self) -> int:
        return self.id_of(self.pad)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset({self.bos_id, self.eos_id, self.pad_id})


class Tokenizer(ABC):
    """Text <-> token ids, both ways.  ``split`` gives the token strings of a text."""

    vocab: Vocabulary

    @abstractmethod
    def split(self, text: str) -> list[str]:
        """Token strings of ``text`` (no padding added)."""

    @abstractmethod
    def join(self, tokens: Sequence[str]) -> str:
        """Inverse of ``split``."""

    def encode(self, text: str) -> list[int]:
        return [self.vocab.id_of(t) for t in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.join([self.vocab.tokens[int(i)] for i in ids])

    def id_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab.tokens[int(i)] for i in ids]


class CharTokenizer(Tokenizer):
    """One character = one token (counting, addition)."""

    def __init__(self, vocab: Vocabulary) -> None:
        if any(len(t) != 1 for t in vocab.tokens):
            raise ValueError("CharTokenizer needs single-character tokens")
        self.vocab = vocab

    def split(self, text: str) -> list[str]:
        bad = sorted({c for c in text if c not in self.vocab.tokens})
        if bad:
            raise CircuitkitError(
                f"characters {''.join(bad)!r} are not in the vocabulary; valid: {''.join(self.vocab.tokens)!r}"
            )
        return list(text)

    def join(self, tokens: Sequence[str]) -> str:
        return "".join(tokens)


class WordTokenizer(Tokenizer):
    """Whitespace-separated words; punctuation '.' and ',' are their own tokens (word-level IOI)."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab

    def split(self, text: str) -> list[str]:
        spaced = text.replace(",", " ,").replace(".", " .")
        toks = spaced.split()
        bad = sorted({t for t in toks if t not in self.vocab.tokens})
        if bad:
            raise CircuitkitError(
                f"words {bad[:10]} are not in the vocabulary ({len(self.vocab)} tokens, e.g. "
                f"{choices_hint(self.vocab.tokens, 12)})"
            )
        return toks

    def join(self, tokens: Sequence[str]) -> str:
        return " ".join(tokens).replace(" ,", ",").replace(" .", ".")


@dataclass(frozen=True)
class Target:
    """One place where the model is read: at ``position`` it should predict ``token`` (an id).

    ``wrong`` is the id of the natural competitor when the task has one (IOI: the subject).
    """

    name: str
    position: int
    token: int
    wrong: int | None = None


class Task(ABC):
    """A task circuitkit can train, probe, invert and patch.  Subclass it in one file."""

    name: str
    seq_len: int
    tokenizer: Tokenizer
    #: named positions this task resolves per input, in reading order
    position_names: tuple[str, ...]
    #: the target used by default for metrics (its name as in ``targets``)
    default_target: str
    #: how held-out accuracy is measured: "targets" (argmax at the default target) or
    #: "generate" (greedy decoding of everything after the prompt, EOS included)
    eval_mode: str = "targets"
    #: how this task was found (``registry.load_task`` sets it): a name, ``file.py:Class`` or
    #: ``module:Class``; checkpoints record it so later verbs reload the task with no flag
    spec: str = ""
    #: the task's default probed-model recipe: ``TrainConfig`` fields such as n_layer, n_head,
    #: d_model and steps (``circuitkit model train`` starts from it; empty = the generic default)
    model_recipe: Mapping[str, Any] = MappingProxyType({})

    # ---- data ---------------------------------------------------------------------------
    @abstractmethod
    def generate(self, rng: random.Random, n: int) -> list[str]:
        """``n`` fresh random inputs (complete texts, answer included, without padding)."""

    @abstractmethod
    def split(self, which: str) -> Sequence[str]:
        """The deterministic ``'train'`` or ``'test'`` split (same list on every call)."""

    def check_split_name(self, which: str) -> None:
        if which not in ("train", "test"):
            raise CircuitkitError(f"unknown split {which!r}; valid: train, test")

    def pick_split(self, which: str, splits: tuple[Sequence[str], Sequence[str]]) -> Sequence[str]:
        """``split(which)`` for a task that holds its fixed (train, test) inputs: the one named, checked."""
        self.check_split_name(which)
        return splits[0] if which == "train" else splits[1]

    # ---- positions and answers ----------------------------------------------------------
    @abstractmethod
    def positions(self, tokens: Tokens) -> dict[str, int]:
        """Named positions of this input (a subset of ``position_names``: some may be absent)."""

    @abstractmethod
    def targets(self, tokens: Tokens) -> list[Target]:
        """Where the answer(s) are read and what they are."""

    def answers(self, tokens: Tokens) -> dict[str, int] | None:
        """The correct answer token id of every target of an *arbitrary* input, by target name, computed
        from its prompt (not read off its written answer); None when the task cannot answer that input.

        The causal model behind interchange predictions runs it on the base with the tested variables set to
        the source's values (``verification/causal.py``).  Optional: a task without it gets data-driven
        predictions only."""
        raise NotImplementedError

    def prompt_length(self, tokens: Tokens) -> int:
        """Number of leading tokens given to the model before it must produce the answer."""
        return min(t.position for t in self.targets(tokens)) + 1

    # ---- contrasts ----------------------------------------------------------------------
    def contrast_random(self, text: str, rng: random.Random, target: str | None = None) -> str:
        """A random other example of the same length in tokens whose answer at ``target``
        (default: ``default_target``) differs — the paper's contrast R — by rejection sampling.
        Falls back to any same-length example when no answer can differ (e.g. a leading 1)."""
        toks = self.tokens(text, pad=False)
        answer = self.target(self.tokens(text), target).token
        fallback = None
        for _ in range(5000):
            other = self.generate(rng, 1)[0]
            if other == text or len(self.tokens(other, pad=False)) != len(toks):
                continue
            if self.target(self.tokens(other), target).token != answer:
                return other
            fallback = fallback or other
        if fallback is not None:
            return fallback
        raise CircuitkitError(f"{self.name}: could not find a random contrast of the same length for {text!r}")

    @abstractmethod
    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        """A minimal edit of ``text`` that changes the answer and keeps the length (contrast F)."""

    def contrast(self, text: str, kind: str, rng: random.Random, target: str | None = None) -> str:
        """The paper's contrast ``kind`` of ``text``: "random" (R, ``contrast_random`` at ``target``) or
        "minimal" (F, ``contrast_minimal``)."""
        if kind == "random":
            return self.contrast_random(text, rng, target)
        if kind == "minimal":
            return self.contrast_minimal(text, rng)
        raise CircuitkitError(f"unknown contrast {kind!r}; valid: {', '.join(CONTRASTS)}")

    # ---- aligned and stratified sources -------------------------------------------------
    def layout(self, tokens: Tokens) -> Hashable:
        """What an *aligned* source shares with its base: by default the index of every named
        position (so the length, and with it every named position, line up token by token).
        Resample ablation in the circuit evaluator draws its sources within the base's layout."""
        return tuple(sorted(self.positions(tokens).items()))

    def holds_fixed(self, features: Sequence[str], position: str | int | None = None) -> tuple[str, ...]:
        """What a *fair* interchange source for testing ``features`` at a site at ``position`` shares
        with its base: ``"layout"`` and/or names of features whose values it must share.  A fair test
        asks about the features and nothing else, so a source holds fixed what the features' own
        definition needs held (counting: the query letter for ``count(query)``) and what the base's
        unpatched input at the site already states about them (addition: the answer digits written up
        to the site).  ``position`` is the site's position (None: any).  Default: the layout."""
        return (LAYOUT,)

    def fair_sources(self, text: str, rng: random.Random, n: int, hold: Sequence[str] = ("layout",),
                     max_tries: int = 4000) -> list[str]:
        """Up to ``n`` inputs other than ``text`` that share with it everything named in ``hold``
        (``"layout"`` and/or feature names; see ``holds_fixed``).

        Default: rejection sampling from ``generate`` (at most ``max_tries`` draws); tasks whose
        strata are rare override it with a constructive sampler."""
        return self.sample_stratum(text, rng, n, hold, lambda r: self.generate(r, 1)[0], max_tries)

    def sample_stratum(self, text: str, rng: random.Random, n: int, hold: Sequence[str],
                       draw: Callable[[random.Random], str | None], max_tries: int = 4000) -> list[str]:
        """Up to ``n`` distinct inputs other than ``text`` from ``draw`` (None = a rejected draw) that share
        ``stratum_key(text, hold)``, in at most ``max_tries`` draws: the rejection loop every sampler of
        ``fair_sources`` shares (a constructive ``draw`` only makes acceptance likelier)."""
        key = self.stratum_key(text, hold) if hold else None
        out: list[str] = []
        seen = {text}
        for _ in range(max_tries):
            if len(out) >= n:
                break
            cand = draw(rng)
            if cand is None or cand in seen:
                continue
            seen.add(cand)
            if key is None or self.stratum_key(cand, hold) == key:
                out.append(cand)
        return out

    def stratum_key(self, text: str, hold: Sequence[str]) -> tuple:
        """The values of everything named in ``hold`` on ``text`` (``None`` where undefined)."""
        toks = self.tokens(text)
        feats = self.__dict__.get("_features_cache") or self.features()
        key = []
        for name in hold:
            if name == LAYOUT:
                key.append(self.layout(toks))
            elif name in feats:
                key.append(feats[name](toks))
            else:
                raise CircuitkitError(f"{self.name}: cannot hold {name!r} fixed; valid: {LAYOUT!r} or a task "
                                      f"feature ({choices_hint(feats, 12)})")
        return tuple(key)

    def proxies(self, feature: str) -> tuple[str, ...]:
        """Features correlated with ``feature`` that a verifier must reject when both are tested
        (the proxy null control).  Default none: the verifier then picks the most correlated
        task feature itself."""
        return ()

    # ---- features -----------------------------------------------------------------------
    @abstractmethod
    def task_features(self) -> list[Feature]:
        """Features specific to this task (``count(query)``, ``F2``, ``carry(2)``, ``IO`` ...)."""

    def features(self) -> dict[str, Feature]:
        """Task features plus the generic ones every task gets for free."""
        cached = self.__dict__.get("_features_cache")
        if cached is None:
            from circuitkit.tasks.features import generic_features

            cached = {f.name: f for f in generic_features(self)}
            cached.update({f.name: f for f in self.task_features()})
            self.__dict__["_features_cache"] = cached
        return dict(cached)

    # ---- training -----------------------------------------------------------------------
    def loss_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask [batch, pos] of positions whose *next* token is trained on.

        Default: every position whose next token is not padding.
        """
        nxt = ids[:, 1:]
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, :-1] = nxt != self.vocab.pad_id
        return mask

    # ---- helpers shared by all tasks ----------------------------------------------------
    @property
    def vocab(self) -> Vocabulary:
        return self.tokenizer.vocab

    def tokens(self, text: str, pad: bool = True) -> list[str]:
        """Token strings of ``text``, padded to ``seq_len`` unless ``pad=False``."""
        toks = self.tokenizer.split(text)
        if len(toks) > self.seq_len:
            raise CircuitkitError(
                f"{self.name}: input has {len(toks)} tokens, more than the task's {self.seq_len}: {text!r}"
            )
        if pad:
            toks = toks + [self.vocab.pad] * (self.seq_len - len(toks))
        return toks

    def try_tokens(self, text: str) -> list[str] | None:
        """``tokens(text)``, or None for a text this task cannot tokenize (a decoder sample may be any string)."""
        try:
            return self.tokens(text)
        except (CircuitkitError, ValueError):
            return None

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[batch, seq_len]`` (right-padded) of many texts."""
        rows = [[self.vocab.id_of(t) for t in self.tokens(s)] for s in texts]
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int], strip_pad: bool = True) -> str:
        toks = self.tokenizer.id_tokens(list(ids))
        if strip_pad:
            while toks and toks[-1] == self.vocab.pad:
                toks.pop()
        return self.tokenizer.join(toks)

    def resolve_position(self, position: str | int, tokens: Tokens) -> int:
        """An index for a named position (or an int index, negative allowed) in this input."""
        if isinstance(position, int) or (isinstance(position, str) and position.lstrip("-").isdigit()):
            idx = int(position)
            if not -self.seq_len <= idx < self.seq_len:
                raise CircuitkitError(
                    f"position {idx} is out of range for {self.name} (sequence length {self.seq_len})"
                )
            return idx % self.seq_len
        named = self.positions(tokens)
        if position not in named:
            if position in self.position_names:
                raise CircuitkitError(
                    f"position {position!r} does not exist in input {self.tokenizer.join(tokens)!r}"
                )
            raise CircuitkitError(
                f"unknown position {position!r} for task {self.name}; valid: "
                f"{choices_hint(self.position_names)} or an integer index"
            )
        return named[position]

    def position_indices(self, ids: torch.Tensor, position: str | int) -> torch.Tensor:
        """[batch] index of ``position`` in each row of ``ids`` [batch, pos] (a named position per input)."""
        if isinstance(position, int) or str(position).lstrip("-").isdigit():
            return torch.full((ids.shape[0],), self.resolve_position(int(position), []), dtype=torch.long)
        return torch.tensor([self.resolve_position(position, self.tokenizer.id_tokens(row)) for row in ids.tolist()],
                            dtype=torch.long)

    def special_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask [batch, pos] of BOS/EOS/PAD positions (excluded from InversionView distances)."""
        special = torch.tensor(sorted(self.vocab.special_ids), device=ids.device)
        return torch.isin(ids, special)

    def target(self, tokens: Tokens, name: str | None = None) -> Target:
        """The named target of an input (default: ``default_target``)."""
        name = name or self.default_target
        for t in self.targets(tokens):
            if t.name == name:
                return t
        valid = [t.name for t in self.targets(tokens)]
        raise CircuitkitError(f"{self.name} has no target {name!r} for this input; valid: {choices_hint(valid)}")

    # ---- user-supplied inputs ------------------------------------------------------------
    #: the task's input format in words, for error messages (tasks override it)
    format_hint: str = ""

    def example(self) -> str:
        """One well-formed input, shown in error messages."""
        return self.generate(random.Random(0), 1)[0]

    def check_input(self, text: object, what: str = "input") -> None:
        """Refuse ``text`` unless it is a complete input of this task: vocabulary, length, layout and
        answer.  User-supplied inputs (``invert --input``, ``patch --base/--source``, a case's
        ``[inversion] queries``) pass through here, so a wrong one is never silently run."""
        expected = f"expected {self.format_hint + ', ' if self.format_hint else ''}e.g. {self.example()!r}"
        if not isinstance(text, str) or not text.strip():
            raise CircuitkitError(f"{what} is empty; {expected}")
        try:
            toks = self.tokens(text, pad=False)
        except CircuitkitError as e:
            raise CircuitkitError(f"{what} {text!r}: {e}") from None
        while toks and toks[-1] == self.vocab.pad:
            toks.pop()
        problem = self.format_problem(toks)
        if problem:
            raise CircuitkitError(f"{what} {text!r} is not a valid {self.name} input: {problem}; {expected}")

    #: a task with a fixed grammar: the regular expression its joined tokens must match, how to say it in words
    #: (``grammar_words``), and ``grammar_problem(groups)`` for what the pattern cannot check (ranges, sums)
    grammar: re.Pattern[str] | None = None
    grammar_words: str = ""

    def grammar_problem(self, groups: tuple[str, ...]) -> str | None:
        """What is wrong with an input whose tokens match ``grammar`` (its groups), or None."""
        return None

    def format_problem(self, tokens: Tokens) -> str | None:
        """What is wrong with ``tokens`` (unpadded) as an input of this task, or None if nothing.

        With a ``grammar``: the joined tokens must match it, then ``grammar_problem``.  Otherwise: it starts with
        BOS and its named positions and answers can be read (tasks may override this with a precise check)."""
        if self.grammar is not None:
            m = self.grammar.fullmatch("".join(tokens))
            return f"it must read {self.grammar_words}" if m is None else self.grammar_problem(m.groups())
        toks = list(tokens)
        if not toks or toks[0] != self.vocab.bos:
            return f"it must start with the BOS token {self.vocab.bos!r}"
        try:
            padded = toks + [self.vocab.pad] * (self.seq_len - len(toks))
            self.positions(padded)
            self.target(padded)
        except (CircuitkitError, ValueError, IndexError, KeyError) as e:
            return f"its answer cannot be read ({e})"
        return None

    def with_pretrained_tokenizer(self, tokenizer_dir: str | Path) -> Task:
        """This task in the tokens of the pretrained GPT-2 found in ``tokenizer_dir`` (a case with ``[model] source =
        "gpt2"``); a task whose inputs have no such form says so."""
        raise CircuitkitError(f"task {self.name!r} has no form in a pretrained GPT-2's tokens; [model] source = "
                              "'gpt2' needs a task that has one (ioi)")

    def describe(self) -> dict:
        """A JSON-able summary stored in checkpoints' metadata."""
        return {
            "name": self.name,
            "seq_len": self.seq_len,
            "vocab": list(self.vocab.tokens),
            "bos": self.vocab.bos,
            "eos": self.vocab.eos,
            "pad": self.vocab.pad,
        }
