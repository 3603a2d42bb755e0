"""A task that lives only in the tests folder, written against the documented Task API: the package
never imports this file by name, so it shows that a user's task runs through every verb unchanged.

Input: ``B`` + five digits 0-4 + ``=`` + the first of them + ``E`` (``B31402=3E``).  The answer is
read at ``=``; a correct model must route position 1 to ``=``, which one attention head can do.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from types import MappingProxyType

from circuitkit.tasks import CharTokenizer, Feature, Target, Task, Tokens, Vocabulary

DIGITS = "01234"
VOCAB = Vocabulary(tokens=tuple(DIGITS + "=BEP"), bos="B", eos="E", pad="P")
N = 5


def _text(digits: Sequence[str]) -> str:
    return "B" + "".join(digits) + "=" + digits[0] + "E"


class FirstDigitTask(Task):
    """Repeat the first of five digits after ``=``."""

    name = "first_digit"
    seq_len = N + 4
    position_names = ("BOS", "D1", "D5", "=", "ANS")
    default_target = "answer"
    format_hint = "B, five digits 0-4, =, the first digit, E"
    model_recipe = MappingProxyType(dict(n_layer=1, n_head=2, d_model=32, batch_size=64, lr=3e-3, steps=1500,
                                         warmup=20, checkpoint_every=500, eval_limit=300))

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer(VOCAB)
        every = [_text(d) for d in itertools.product(DIGITS, repeat=N)]
        random.Random(0).shuffle(every)
        self._splits = {"train": every[:2500], "test": every[2500:]}

    def generate(self, rng: random.Random, n: int) -> list[str]:
        return [_text([rng.choice(DIGITS) for _ in range(N)]) for _ in range(n)]

    def split(self, which: str) -> Sequence[str]:
        self.check_split_name(which)
        return self._splits[which]

    def positions(self, tokens: Tokens) -> dict[str, int]:
        return {"BOS": 0, "D1": 1, "D5": N, "=": N + 1, "ANS": N + 2}

    def targets(self, tokens: Tokens) -> list[Target]:
        return [Target("answer", N + 1, VOCAB.id_of(tokens[N + 2]))]

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        digits = list(text[1 : N + 1])
        digits[0] = rng.choice([d for d in DIGITS if d != digits[0]])
        return _text(digits)

    def task_features(self) -> list[Feature]:
        def at(i: int):
            return lambda toks: toks[i] if len(toks) > i and toks[i] in DIGITS else None

        return [Feature("first", at(1), "the first digit (the answer)"),
                Feature("last", at(N), "the fifth digit")]
