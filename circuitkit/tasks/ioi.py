"""Indirect Object Identification (Wang et al. 2022), as probed in the InversionView paper.

A prompt names two people, then repeats one of them (the subject S) as the giver; the model must
complete with the other one (the indirect object IO)::

    BABA  "Then, John and Mary went to the store. John gave a drink to" -> " Mary"
    ABBA  "Then, Mary and John went to the store. John gave a drink to" -> " Mary"

Each of the 15 hand-written base templates below yields one template of each family: the first
clause names S then IO (BABA) or IO then S (ABBA), exactly as in the paper, so the two families
differ only in that order.  The text is the whole prompt plus the answer; the answer is read at
``END``, the ``to`` just before the final name, and the metric is logit(IO) - logit(S) there.

Two tokenizer modes:

* ``IOITask()`` (default): a word-level vocabulary built from the templates' words, the names,
  places and objects, plus ``<bos>``/``<eos>``/``<pad>``; texts look like
  ``"<bos> Then, Mary and John went to the store. John gave a drink to Mary <eos>"`` and are
  padded to ``seq_len`` (= ``SEQ_LEN``, 21) tokens.  This is what a small model is trained on here.
* ``IOITask(tokenizer="gpt2", tokenizer_dir=DIR)``: the real GPT-2 tokenizer read from local
  files (never downloaded), for probing GPT-2-family checkpoints.  Names, places and objects are
  kept only where they are one token with a leading space (``" Mary"``).  GPT-2 uses one token,
  ``<|endoftext|>``, as BOS, EOS and padding, so a trailing EOS could not be told apart from
  padding: texts in this mode are ``"<|endoftext|>Then, Mary ... to Mary"`` with no EOS.

Split: every (base template, unordered name pair) combination is assigned once, by a shuffle
seeded with 0, to train (80%) or test (20%); the train split holds ``N_TRAIN`` = 100,000 distinct
prompts and the test split ``N_TEST`` = 10,000, drawn from their own combinations only, so no test
prompt shares its template *and* its pair of names with any training prompt.
"""
from __future__ import annotations

import os
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from types import MappingProxyType

import torch

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.tasks.base import LAYOUT, Feature, Target, Task, Tokenizer, Tokens, Vocabulary, WordTokenizer

# ---- word lists (written for circuitkit) ---------------------------------------------------
#: Base templates.  ``{n1} and {n2}`` is the first clause (S IO for BABA, IO S for ABBA); every
#: template names exactly four people in the order n1, n2, s, io and ends with "to {io}".
BASE_TEMPLATES: tuple[str, ...] = (
    "Then, {n1} and {n2} went to the {place}. {s} gave a {obj} to {io}",
    "When {n1} and {n2} went to the {place}, {s} gave a {obj} to {io}",
    "After {n1} and {n2} arrived at the {place}, {s} handed a {obj} to {io}",
    "While {n1} and {n2} were at the {place}, {s} passed a {obj} to {io}",
    "Then, {n1} and {n2} had a long day at the {place}. {s} offered a {obj} to {io}",
    "Yesterday {n1} and {n2} walked to the {place}. {s} showed a {obj} to {io}",
    "Later, {n1} and {n2} met at the {place}. {s} threw a {obj} to {io}",
    "Once {n1} and {n2} reached the {place}, {s} sent a {obj} to {io}",
    "This morning {n1} and {n2} drove to the {place}. {s} brought a {obj} to {io}",
    "In the evening {n1} and {n2} stopped by the {place}. {s} lent a {obj} to {io}",
    "Then, {n1} and {n2} spent the afternoon at the {place}. {s} sold a {obj} to {io}",
    "Before {n1} and {n2} left the {place}, {s} tossed a {obj} to {io}",
    "On Sunday {n1} and {n2} visited the {place}. Afterwards {s} mailed a {obj} to {io}",
    "Since {n1} and {n2} were working at the {place}, {s} gave the {obj} to {io}",
    "Then, {n1} and {n2} found a {obj} at the {place}. {s} gave it to {io}",
)
FAMILIES: tuple[str, ...] = ("ABBA", "BABA")
NAMES: tuple[str, ...] = (
    "Mary", "John", "James", "Michael", "David", "Sarah", "Robert", "Daniel", "Paul", "Mark",
    "Thomas", "Peter", "Anna", "Emma", "Laura", "Lisa", "Kate", "Jane", "Alice", "Rose",
    "Tom", "Ben", "Sam", "Max", "Jack", "Adam", "Eric", "Ryan", "Kevin", "Brian",
    "Steve", "Chris", "Andrew", "Joe", "Linda", "Susan", "Karen", "Helen", "Grace", "Victoria",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store", "park", "school", "hospital", "station", "garden", "office", "restaurant", "market", "library",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "ball", "book", "drink", "ring", "letter", "basket", "snack", "bottle", "necklace", "present",
)  # fmt: skip

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
GPT2_SPECIAL = "<|endoftext|>"
TOKENIZER_MODES = ("word", "gpt2")

N_TRAIN = 100_000
N_TEST = 10_000
TEST_FRACTION = 0.2


def render(template: int, family: str, io: str, s: str, place: str, obj: str) -> str:
    """The sentence (no BOS/EOS) of base template ``template`` in ``family`` ("ABBA" or "BABA")."""
    n1, n2 = (io, s) if family == "ABBA" else (s, io)
    return BASE_TEMPLATES[template].format(n1=n1, n2=n2, s=s, io=io, place=place, obj=obj)


def _template_words() -> list[str]:
    """Words of the templates themselves (placeholders removed), '.' and ',' split off."""
    words: set[str] = set()
    for tpl in BASE_TEMPLATES:
        text = tpl.format(n1="", n2="", s="", io="", place="", obj="")
        words.update(text.replace(",", " , ").replace(".", " . ").split())
    return sorted(words)


WORD_VOCAB = Vocabulary(
    tokens=tuple(_template_words()) + NAMES + PLACES + OBJECTS + (BOS, EOS, PAD), bos=BOS, eos=EOS, pad=PAD
)
"""Word-level vocabulary in id order: sorted template words, names, places, objects, specials."""
SEQ_LEN = max(
    len(WordTokenizer(WORD_VOCAB).split(f"{BOS} {render(t, 'ABBA', 'Mary', 'John', 'store', 'ball')} {EOS}"))
    for t in range(len(BASE_TEMPLATES))
)
"""Longest word-level text in tokens (BOS and EOS included); every prompt is padded to it."""


# ---- GPT-2 tokenizer adapter ----------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """Adapts a Hugging Face GPT-2 (byte-level BPE) tokenizer to circuitkit's ``Tokenizer``.

    The vocabulary is the HF tokens in id order (``"ĠMary"`` for " Mary").  GPT-2 has a single
    special token, ``<|endoftext|>``, which serves as BOS, EOS and padding; ``Vocabulary`` only
    requires its *tokens* to be unique, so all three roles simply name that one token and
    ``special_ids`` is the one-element set.  The price is that a trailing EOS looks like padding,
    which is why IOI texts in this mode do not end with one.
    """

    def __init__(self, hf: object, special: str = GPT2_SPECIAL) -> None:
        self.hf = hf
        index: dict[str, int] = hf.get_vocab()  # type: ignore[attr-defined]
        tokens = sorted(index, key=index.__getitem__)
        if [index[t] for t in tokens] != list(range(len(tokens))):
            raise CircuitkitError("the GPT-2 tokenizer's ids are not contiguous from 0; cannot build a vocabulary")
        if special not in index:
            raise CircuitkitError(f"the GPT-2 tokenizer has no {special!r} token")
        self.vocab = Vocabulary(tokens=tuple(tokens), bos=special, eos=special, pad=special)

    def split(self, text: str) -> list[str]:
        return list(self.hf.tokenize(text))  # type: ignore[attr-defined]

    def join(self, tokens: Sequence[str]) -> str:
        return self.hf.convert_tokens_to_string(list(tokens))  # type: ignore[attr-defined]


def load_gpt2_tokenizer(tokenizer_dir: str | os.PathLike[str] | None) -> HFTokenizer:
    """The GPT-2 tokenizer from local files in ``tokenizer_dir``; never downloads anything."""
    hint = (
        "put the GPT-2 tokenizer files (vocab.json and merges.txt, or tokenizer.json) in that directory, "
        "e.g. copy them from a GPT-2 checkpoint saved with save_pretrained"
    )
    if tokenizer_dir is None:
        raise CircuitkitError(f"IOITask(tokenizer='gpt2') needs tokenizer_dir=DIR: {hint}")
    path = os.fspath(tokenizer_dir)
    has_json = os.path.isfile(os.path.join(path, "tokenizer.json"))
    has_bpe = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    if not (has_json or has_bpe):
        found = sorted(os.listdir(path)) if os.path.isdir(path) else None
        where = "does not exist" if found is None else f"contains {choices_hint(found, 10) or 'nothing'}"
        raise CircuitkitError(f"no GPT-2 tokenizer files in {path!r} (the directory {where}): {hint}")
    from transformers import AutoTokenizer, GPT2TokenizerFast

    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        # Bare vocab.json + merges.txt without config.json / tokenizer_config.json: AutoTokenizer
        # cannot tell the class, but these files are exactly a GPT-2 tokenizer.
        try:
            hf = GPT2TokenizerFast.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise CircuitkitError(f"could not load a GPT-2 tokenizer from {path!r}: {err}; {hint}") from None
    return HFTokenizer(hf)


# ---- parsing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Where the slots of one rendered template lie, as token indices (BOS at 0)."""

    template: int
    n1: int
    n2: int
    s2: int
    io2: int
    place: int
    obj: int


@dataclass(frozen=True)
class _Parsed:
    """A token list matched to a template: slot positions and the (bare) words in them."""

    layout: _Layout
    n1: str
    n2: str
    s2: str
    io2: str
    place: str
    obj: str
    eos: int | None

    @property
    def family(self) -> str:
        """"BABA" when the first clause starts with S, "ABBA" when with IO; ValueError otherwise."""
        if self.n1 != self.n2 and self.s2 == self.n1:
            return "BABA"
        if self.n1 != self.n2 and self.s2 == self.n2:
            return "ABBA"
        raise ValueError("the repeated name does not identify an IO and an S (e.g. an ABC prompt)")

    @property
    def io(self) -> str:
        return self.n2 if self.family == "BABA" else self.n1

    @property
    def io_pos(self) -> int:
        return self.layout.n2 if self.family == "BABA" else self.layout.n1

    @property
    def s1_pos(self) -> int:
        return self.layout.n1 if self.family == "BABA" else self.layout.n2


class IOITask(Task):
    """Indirect object identification on BABA/ABBA templates, word-level or GPT-2 tokens.

    ``names``/``places``/``objects`` are the fillers usable with this tokenizer (all of ``NAMES``
    etc. in word mode; the single-token ones in GPT-2 mode); ``mode`` is "word" or "gpt2".
    """

    name = "ioi"
    mode: str
    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    position_names = ("BOS", "IO", "IO+1", "S1", "S1+1", "S2", "END", "EOS")
    default_target = "IO"
    #: 2L, 4H, d64.  init_std 0.1: with 0.02 every recipe tried ended at ln 2 (both names equally
    #: likely, 50% IO over S); with 0.1 the loss is ~0 after 1,500 steps
    model_recipe = MappingProxyType(dict(n_layer=2, n_head=4, d_model=64, batch_size=128, lr=1e-3, steps=3000,
                                         warmup=50, checkpoint_every=500, bucket_by_length=False, init_std=0.1))

    def __init__(self, tokenizer: str = "word", tokenizer_dir: str | os.PathLike[str] | None = None) -> None:
        if tokenizer not in TOKENIZER_MODES:
            raise CircuitkitError(f"unknown IOI tokenizer {tokenizer!r}; valid: {choices_hint(TOKENIZER_MODES)}")
        self.mode = tokenizer
        self.tokenizer_dir = None if tokenizer_dir is None else os.fspath(tokenizer_dir)
        if tokenizer == "word":
            self.tokenizer: Tokenizer = WordTokenizer(WORD_VOCAB)
            self._prefix, self._suffix = f"{BOS} ", f" {EOS}"
            self.names, self.places, self.objects = NAMES, PLACES, OBJECTS
            self._word_of: dict[str, str] = {w: w for w in NAMES + PLACES + OBJECTS}
        else:
            self.tokenizer = load_gpt2_tokenizer(tokenizer_dir)
            self._prefix, self._suffix = self.vocab.bos, ""
            self._word_of = {}
            kept = [self._single_tokens(words) for words in (NAMES, PLACES, OBJECTS)]
            self.names, self.places, self.objects = kept
            if len(self.names) < 5 or not self.places or not self.objects:
                raise CircuitkitError(
                    f"the GPT-2 tokenizer in {self.tokenizer_dir!r} has too few single-token words for IOI "
                    f"(names {len(self.names)} of 5 needed for the ABC corruption; places {len(self.places)}; "
                    f"objects {len(self.objects)})"
                )
        self._token_of = {w: t for t, w in self._word_of.items()}
        self._kind = {**{n: "N" for n in self.names}, **{p: "P" for p in self.places}, **{o: "O" for o in self.objects}}
        self._layouts = self._build_layouts()
        self.seq_len = 1 + max(len(key) for key in self._layouts) + (1 if self._suffix else 0)

    def _single_tokens(self, words: Sequence[str]) -> tuple[str, ...]:
        """The words that are one GPT-2 token with their leading space (records the token string)."""
        kept = []
        for w in words:
            toks = self.tokenizer.split(" " + w)
            if len(toks) == 1:
                self._word_of[toks[0]] = w
                kept.append(w)
        return tuple(kept)

    def _build_layouts(self) -> dict[tuple[str, ...], _Layout]:
        """Skeleton (token strings, fillers replaced by their kind) of every template -> layout.

        The key holds the tokens from after BOS up to and including the final name; fillers are
        single tokens in both modes, so one rendering per template gives every prompt's layout.
        """
        layouts: dict[tuple[str, ...], _Layout] = {}
        for t in range(len(BASE_TEMPLATES)):
            sentence = render(t, "ABBA", self.names[0], self.names[1], self.places[0], self.objects[0])
            toks = self.tokenizer.split(self._prefix + sentence)
            body = toks[1:]
            key = tuple(self._kind.get(self._word_of.get(x, ""), x) for x in body)
            names = [i + 1 for i, x in enumerate(body) if self._kind.get(self._word_of.get(x, "")) == "N"]
            if len(names) != 4 or key.count("P") != 1 or key.count("O") != 1:
                raise CircuitkitError(f"IOI template {t} does not tokenize into single-token slots: {toks}")
            layouts[key] = _Layout(
                template=t, n1=names[0], n2=names[1], s2=names[2], io2=names[3],
                place=key.index("P") + 1, obj=key.index("O") + 1,
            )  # fmt: skip
        return layouts

    # ---- text -------------------------------------------------------------------------------
    def make_text(self, template: int, family: str, io: str, s: str, place: str, obj: str) -> str:
        """The full text (BOS, prompt, answer, EOS in word mode) of one IOI example."""
        return self._prefix + render(template, family, io, s, place, obj) + self._suffix

    def _parse(self, tokens: Tokens) -> _Parsed:
        """Match a token list to a template; ValueError/KeyError/IndexError if it is not one."""
        toks = list(tokens)
        if not toks or toks[0] != self.vocab.bos:
            raise ValueError("input does not start with BOS")
        end = len(toks)
        while end > 1 and toks[end - 1] == self.vocab.pad:
            end -= 1
        eos = None
        if self._suffix and toks[end - 1] == self.vocab.eos:
            end, eos = end - 1, end - 1
        key = tuple(self._kind.get(self._word_of.get(x, ""), x) for x in toks[1:end])
        lay = self._layouts[key]
        word = lambda i: self._word_of[toks[i]]  # noqa: E731
        return _Parsed(lay, word(lay.n1), word(lay.n2), word(lay.s2), word(lay.io2), word(lay.place), word(lay.obj), eos)

    format_hint = "BOS, one of the BABA/ABBA templates with two names, a place and an object, the indirect object"

    def format_problem(self, tokens: Tokens) -> str | None:
        """A template prompt whose final name is the IO (BABA/ABBA), or an ABC-corrupted prompt (three
        distinct names, as ``corrupt_abc`` writes: a source of the corrupted distribution)."""
        toks = list(tokens)
        if not toks or toks[0] != self.vocab.bos:
            return f"it must start with the BOS token {self.vocab.bos!r}"
        try:
            p = self._parse(toks + [self.vocab.pad] * (self.seq_len - len(toks)))
        except (ValueError, KeyError, IndexError):
            return "it matches none of the templates (names, places and objects must be the task's own words)"
        if p.n1 == p.n2:
            return f"the two names of the first clause are both {p.n1!r}"
        if p.s2 not in (p.n1, p.n2):  # ABC: the corrupted distribution
            return None if p.io2 in (p.n1, p.n2) else f"the final name {p.io2!r} is not one of the first clause's names"
        if p.io2 != p.io:
            return f"the final name {p.io2!r} must be the indirect object {p.io!r}"
        return None

    # ---- data -------------------------------------------------------------------------------
    def generate(self, rng: random.Random, n: int) -> list[str]:
        """Random examples: template, family, IO != S, place and object drawn uniformly."""
        out = []
        for _ in range(n):
            t, fam = rng.randrange(len(BASE_TEMPLATES)), rng.choice(FAMILIES)
            io, s = rng.sample(self.names, 2)
            out.append(self.make_text(t, fam, io, s, rng.choice(self.places), rng.choice(self.objects)))
        return out

    def split(self, which: str) -> Sequence[str]:
        """Train (100,000) or test (10,000) prompts; disjoint in (base template, name pair)."""
        self.check_split_name(which)
        train, test = _splits(self.names, self.places, self.objects, self._prefix, self._suffix)
        return train if which == "train" else test

    # ---- positions and answers ----------------------------------------------------------------
    def positions(self, tokens: Tokens) -> dict[str, int]:
        """BOS always; S2, END (and EOS) for any template match; IO, IO+1, S1, S1+1 when S repeats a name
        (the tokens right after each first-clause name, where previous-token information about it sits).

        For an ABC prompt (three different names) IO and S1 are undefined and left out.
        """
        named = {"BOS": 0}
        try:
            p = self._parse(tokens)
        except (ValueError, KeyError, IndexError):
            return named
        named.update({"S2": p.layout.s2, "END": p.layout.io2 - 1})
        if p.eos is not None:
            named["EOS"] = p.eos
        try:
            named.update({"IO": p.io_pos, "IO+1": p.io_pos + 1, "S1": p.s1_pos, "S1+1": p.s1_pos + 1})
        except ValueError:
            pass
        return named

    def targets(self, tokens: Tokens) -> list[Target]:
        """The final name written in the text, read at END; the competitor is the subject at S2."""
        try:
            p = self._parse(tokens)
        except (ValueError, KeyError, IndexError):
            raise CircuitkitError(f"not an IOI prompt: tokens {list(tokens)}") from None
        io_tok, s_tok = tokens[p.layout.io2], tokens[p.layout.s2]
        return [Target("IO", p.layout.io2 - 1, self.vocab.id_of(io_tok), wrong=self.vocab.id_of(s_tok))]

    def answers(self, tokens: Tokens) -> dict[str, int] | None:
        """The causal model's answer, computed from the prompt (not the written final name): the first-clause
        name that S2 does not repeat.  None for an ABC prompt or a first clause naming one person twice."""
        try:
            p = self._parse(tokens)
            io = p.io
        except (ValueError, KeyError, IndexError):
            return None
        return {"IO": self.vocab.id_of(self._token_of[io])}

    def loss_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Only the answer is trained: True at END, the position before the last non-special token.

        Every other next token is predictable from the template or uniformly random (names, place,
        object), so training on them adds no IOI signal; the paper's tasks train the answer only too.
        """
        special = torch.tensor(sorted(self.vocab.special_ids), device=ids.device)
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        last = torch.where(torch.isin(ids, special), torch.zeros_like(pos), pos).max(dim=1).values
        mask = torch.zeros_like(ids, dtype=torch.bool)
        rows = torch.nonzero(last >= 2).squeeze(1)
        mask[rows, last[rows] - 1] = True
        return mask

    # ---- contrasts ----------------------------------------------------------------------------
    def corrupt_abc(self, text: str, rng: random.Random) -> str:
        """The ABC corruption: IO, S1 and S2 become three distinct new names (same token length).

        The new names are drawn from those not in the prompt; the IO's replacement is also written
        as the final answer, so the text stays a prompt plus the name in the IO slot.
        """
        toks = self.tokens(text, pad=False)
        try:
            p = self._parse(toks)
            io_pos, s1_pos = p.io_pos, p.s1_pos
        except (ValueError, KeyError, IndexError):
            raise CircuitkitError(f"not an IOI prompt with a repeated subject: {text!r}") from None
        c_io, c_s1, c_s2 = rng.sample([n for n in self.names if n not in (p.io, p.s2)], 3)
        for pos, new in ((io_pos, c_io), (s1_pos, c_s1), (p.layout.s2, c_s2), (p.layout.io2, c_io)):
            toks[pos] = self._token_of[new]
        return self.tokenizer.join(toks)

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        """IOI's standard contrast is the ABC corruption (``corrupt_abc``)."""
        return self.corrupt_abc(text, rng)

    # ---- stratified sources ----------------------------------------------------------------------
    def layout(self, tokens: Tokens) -> Hashable:
        """The base template: its slots (names, place, object) sit at the same token indices in
        every prompt of it, in both families."""
        return self._parse(tokens).layout.template

    #: features whose test holds the base's own two names fixed (their roles may change)
    NAME_ROLE_FEATURES = ("IO", "S", "ABBA_or_BABA", "IO_first")

    def holds_fixed(self, features: Sequence[str], position: str | int | None = None) -> tuple[str, ...]:
        """The template, and for the name-role features (IO, S, family) the base's own two names:
        a fair source for "this head carries IO" swaps IO and S, or flips S2, among the base's own
        names, so the test asks which of the two is the IO, not which names occur."""
        if any(f in self.NAME_ROLE_FEATURES for f in features):
            return (LAYOUT, "names")
        return (LAYOUT,)

    def fair_sources(self, text: str, rng: random.Random, n: int, hold: Sequence[str] = (LAYOUT,),
                     max_tries: int = 4000) -> list[str]:
        """Constructive: the base's template when the layout is held, its two names (in random roles
        and family) when ``names`` is held; everything else drawn at random."""
        try:
            p = self._parse(self.tokens(text))
            pair = (p.io, p.s2)
        except (ValueError, KeyError, IndexError):
            raise CircuitkitError(f"not an IOI prompt with a repeated subject: {text!r}") from None
        rest = [h for h in hold if h not in (LAYOUT, "names")]

        def draw(r: random.Random) -> str:
            t = p.layout.template if LAYOUT in hold else r.randrange(len(BASE_TEMPLATES))
            io, s = r.sample(pair, 2) if "names" in hold else r.sample(self.names, 2)
            return self.make_text(t, r.choice(FAMILIES), io, s, r.choice(self.places), r.choice(self.objects))

        return self.sample_stratum(text, rng, n, rest, draw, max_tries)

    # ---- features -----------------------------------------------------------------------------
    def task_features(self) -> list[Feature]:
        parse = self._parse
        return [
            Feature("names", lambda t: "+".join(sorted((parse(t).io, parse(t).s2))),
                    "the two names of the prompt, whatever their roles"),
            Feature("IO", lambda t: parse(t).io, "the indirect object (the first-clause name not repeated)"),
            Feature("S", lambda t: parse(t).s2, "the subject (the repeated name)", reads=("S2",)),
            Feature("ABBA_or_BABA", lambda t: parse(t).family, "template family: first clause IO S (ABBA) or S IO"),
            Feature("IO_first", lambda t: parse(t).family == "ABBA", "IO appears before S1"),
            Feature("place", lambda t: parse(t).place, "the place"),
            Feature("object", lambda t: parse(t).obj, "the object given"),
            Feature("template", lambda t: parse(t).layout.template, "index of the base template"),
        ]

    def with_pretrained_tokenizer(self, tokenizer_dir: str | os.PathLike[str]) -> IOITask:
        """The same prompts in GPT-2's own BPE tokens (each name a single token), read from ``tokenizer_dir``."""
        return type(self)(tokenizer="gpt2", tokenizer_dir=tokenizer_dir)

    def describe(self) -> dict:
        out = super().describe()
        out.update({"tokenizer": self.mode, "tokenizer_dir": self.tokenizer_dir})
        return out


@lru_cache(maxsize=4)
def _splits(
    names: tuple[str, ...], places: tuple[str, ...], objects: tuple[str, ...], prefix: str, suffix: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Train/test texts; test holds a fixed 20% of the (base template, unordered name pair) combos."""
    combos = [(t, pair) for t in range(len(BASE_TEMPLATES)) for pair in combinations(names, 2)]
    random.Random(0).shuffle(combos)
    n_test = int(TEST_FRACTION * len(combos))
    test_combos, held_out = combos[:n_test], set(combos[:n_test])

    def draw(rng: random.Random, pick, n: int) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        while len(seen) < n:
            t, pair = pick(rng)
            io, s = pair if rng.random() < 0.5 else pair[::-1]
            text = prefix + render(t, rng.choice(FAMILIES), io, s, rng.choice(places), rng.choice(objects)) + suffix
            seen[text] = None
        return tuple(seen)

    def pick_train(rng: random.Random) -> tuple[int, tuple[str, str]]:
        while True:
            t, (i, j) = rng.randrange(len(BASE_TEMPLATES)), sorted(rng.sample(range(len(names)), 2))
            if (t, (names[i], names[j])) not in held_out:
                return t, (names[i], names[j])

    return draw(random.Random(1), pick_train, N_TRAIN), draw(random.Random(2), lambda r: r.choice(test_combos), N_TEST)
