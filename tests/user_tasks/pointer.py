"""A task whose answer is a lookup through an index variable: ``B`` + five digits 0-4 + a pointer letter
``a``-``e`` (which digit) + ``=`` + the digit it points at + ``E`` (``B31402c=4E``: ``c`` points at the third
digit, 4).  No small function of other features gives the answer from the pointer (it depends on the pointer
*and* every digit it could point at), so only the task's causal model (``answers``: the answer of any input)
can say what the pointer predicts in an interchange.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from types import MappingProxyType

from circuitkit.tasks import CharTokenizer, Feature, Target, Task, Tokens, Vocabulary

DIGITS = "01234"
POINTERS = "abcde"
VOCAB = Vocabulary(tokens=tuple(DIGITS + POINTERS + "=BEP"), bos="B", eos="E", pad="P")
N = 5


def _text(digits: Sequence[str], pointer: str) -> str:
    return "B" + "".join(digits) + pointer + "=" + digits[POINTERS.index(pointer)] + "E"


class PointerTask(Task):
    """Copy the digit that the pointer letter names."""

    name = "pointer"
    seq_len = N + 5
    position_names = ("BOS", "D1", "D5", "PTR", "=", "ANS")
    default_target = "answer"
    format_hint = "B, five digits 0-4, a pointer a-e, =, the digit it points at, E"
    # the mimetic attention init learns the positional lookup in a few thousand steps (the default init: 28%
    # held-out accuracy after 2,500)
    model_recipe = MappingProxyType(dict(n_layer=2, n_head=2, d_model=48, batch_size=128, lr=5e-3, steps=3000,
                                         warmup=50, checkpoint_every=1000, eval_limit=500, attn_init="mimetic"))

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer(VOCAB)
        every = [_text(d, p) for d in itertools.product(DIGITS, repeat=N) for p in POINTERS]
        random.Random(0).shuffle(every)
        self._splits = {"train": every[:12000], "test": every[12000:]}

    def generate(self, rng: random.Random, n: int) -> list[str]:
        return [_text([rng.choice(DIGITS) for _ in range(N)], rng.choice(POINTERS)) for _ in range(n)]

    def split(self, which: str) -> Sequence[str]:
        self.check_split_name(which)
        return self._splits[which]

    def positions(self, tokens: Tokens) -> dict[str, int]:
        return {"BOS": 0, "D1": 1, "D5": N, "PTR": N + 1, "=": N + 2, "ANS": N + 3}

    def targets(self, tokens: Tokens) -> list[Target]:
        return [Target("answer", N + 2, VOCAB.id_of(tokens[N + 3]))]

    def answers(self, tokens: Tokens) -> dict[str, int] | None:
        pointer = tokens[N + 1]
        if pointer not in POINTERS or any(t not in DIGITS for t in tokens[1 : N + 1]):
            return None
        return {"answer": VOCAB.id_of(tokens[1 + POINTERS.index(pointer)])}

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        digits, pointer = list(text[1 : N + 1]), text[N + 1]
        others = [p for p in POINTERS if digits[POINTERS.index(p)] != digits[POINTERS.index(pointer)]]
        return _text(digits, rng.choice(others)) if others else _text(digits, pointer)

    def task_features(self) -> list[Feature]:
        return [Feature("index", lambda t: t[N + 1] if t[N + 1] in POINTERS else None,
                        "the pointer: which digit is copied", reads=("PTR",)),
                Feature("pointed", lambda t: t[1 + POINTERS.index(t[N + 1])], "the digit it points at (the answer)")]
