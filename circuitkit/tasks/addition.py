"""Three-digit addition (InversionView paper, section 4.2): ``B615+861=1476E``, padded to 14.

Vocabulary: digits 0-9 -> 0-9, ``B`` 10, ``+`` 11, ``=`` 12, ``E`` 13, ``P`` 14.  Operands are in
[100, 999]; the answer is written without leading zeros (3 or 4 digits).  The split shuffles all
810,000 pairs with Python ``random`` seeded with 0 and keeps 75% for training, as the paper did.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import lru_cache
from types import MappingProxyType

import torch

from circuitkit.tasks.base import LAYOUT, CharTokenizer, Feature, Target, Task, Tokens, Vocabulary

VOCAB = Vocabulary(tokens=tuple("0123456789B+=EP"), bos="B", eos="E", pad="P")
SEQ_LEN = 14
LOW, HIGH = 100, 999
TRAIN_RATIO = 0.75
_FORMAT = re.compile(r"B(\d+)\+(\d+)=(\d+)E")


def format_sum(a: int, b: int) -> str:
    return f"B{a}+{b}={a + b}E"


@lru_cache(maxsize=1)
def _paper_splits() -> tuple[tuple[str, ...], tuple[str, ...]]:
    pairs = [(i, j) for i in range(LOW, HIGH + 1) for j in range(LOW, HIGH + 1)]
    random.Random(0).shuffle(pairs)
    n_train = int(TRAIN_RATIO * len(pairs))
    texts = [format_sum(a, b) for a, b in pairs]
    return tuple(texts[:n_train]), tuple(texts[n_train:])


def operands(tokens: Tokens) -> tuple[int, int]:
    """(a, b) read from the first and second operand digits."""
    toks = list(tokens)
    plus, eq = toks.index("+"), toks.index("=")
    return int("".join(toks[1:plus])), int("".join(toks[plus + 1 : eq]))


def digit(n: int, k: int) -> int:
    """k-th digit of a 3-digit number counted from the left (k = 1, 2, 3)."""
    return (n // 10 ** (3 - k)) % 10


def carry(tokens: Tokens, k: int) -> int:
    """Carry out of digit column k (1 = hundreds, 2 = tens, 3 = ones): 1 if a%10^(4-k) + b%10^(4-k) overflows."""
    a, b = operands(tokens)
    mod = 10 ** (3 - k + 1)
    return int((a % mod) + (b % mod) >= mod)


def _draw_with_prefix(rng: random.Random, total: str, k: int) -> str | None:
    """A uniformly random problem (a, b in [LOW, HIGH]) whose sum has the length of ``total`` and starts
    with its first ``k`` digits (None: a rejected draw; accepted draws are uniform on that stratum)."""
    span = 10 ** (len(total) - k)
    lo = max(2 * LOW, int(total[:k]) * span)
    hi = min(2 * HIGH, (int(total[:k]) + 1) * span - 1)
    a = rng.randint(LOW, HIGH)
    b_lo, b_hi = max(LOW, lo - a), min(HIGH, hi - a)
    width = min(hi - lo + 1, HIGH - LOW + 1)  # the most b values any a can have
    if b_lo > b_hi or rng.random() * width >= b_hi - b_lo + 1:
        return None
    return format_sum(a, rng.randint(b_lo, b_hi))


class AdditionTask(Task):
    """The paper's 3-digit addition task."""

    name = "addition"
    seq_len = SEQ_LEN
    position_names = ("BOS", "F1", "F2", "F3", "+", "S1", "S2", "S3", "=", "A1", "A2", "A3", "A4", "EOS")
    default_target = "A1"
    #: the paper's architecture (2L, 4H, d32) with a CPU-sized budget
    model_recipe = MappingProxyType(dict(n_layer=2, n_head=4, d_model=32, batch_size=256, lr=3e-3, steps=12000,
                                         checkpoint_every=1000, bucket_by_length=False))
    eval_mode = "generate"

    format_hint = f"B, a {LOW}-{HIGH}, +, another {LOW}-{HIGH}, =, their sum, E"

    tokenizer = CharTokenizer(VOCAB)  # immutable, so one per class

    grammar, grammar_words = _FORMAT, "B, digits, +, digits, =, digits, E"

    def grammar_problem(self, groups: tuple[str, ...]) -> str | None:
        """B a + b = a+b E with three-digit operands in [100, 999] and the right sum."""
        a, b, answer = groups
        for name, op in (("first", a), ("second", b)):
            if len(op) != 3 or not LOW <= int(op) <= HIGH:
                return f"the {name} operand {op!r} is not a number in {LOW}..{HIGH}"
        if answer != str(int(a) + int(b)):
            return f"the answer {answer!r} is not {a}+{b} = {int(a) + int(b)}"
        return None

    def generate(self, rng: random.Random, n: int) -> list[str]:
        return [format_sum(rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)) for _ in range(n)]

    def split(self, which: str) -> Sequence[str]:
        return self.pick_split(which, _paper_splits())

    def positions(self, tokens: Tokens) -> dict[str, int]:
        toks = list(tokens)
        plus, eq = toks.index("+"), toks.index("=")
        named = {"BOS": 0, "+": plus, "=": eq}
        for k in range(1, 4):
            named[f"F{k}"] = k
            named[f"S{k}"] = plus + k
        end = toks.index("E") if "E" in toks else len(toks)
        for k in range(1, 5):
            if eq + k < end:
                named[f"A{k}"] = eq + k
        if "E" in toks:
            named["EOS"] = end
        return named

    def targets(self, tokens: Tokens) -> list[Target]:
        """A1 is read at ``=``, A_{k+1} at A_k, and EOS after the last answer digit."""
        pos = self.positions(tokens)
        out = []
        prev = pos["="]
        for k in range(1, 5):
            if f"A{k}" not in pos:
                break
            out.append(Target(f"A{k}", prev, VOCAB.id_of(tokens[pos[f"A{k}"]])))
            prev = pos[f"A{k}"]
        if "EOS" in pos:
            out.append(Target("EOS", prev, VOCAB.eos_id))
        return out

    def answers(self, tokens: Tokens) -> dict[str, int] | None:
        """The causal model's answers: the digits of a + b, and EOS after them, on an input whose written
        answer has the sum's length (else None: the answer would sit at other positions)."""
        try:
            a, b = operands(tokens)
            written = self.positions(tokens)
        except (ValueError, IndexError):
            return None
        total = str(a + b)
        if sum(f"A{k}" in written for k in range(1, 5)) != len(total):
            return None
        out = {f"A{k}": VOCAB.id_of(d) for k, d in enumerate(total, 1)}
        out["EOS"] = VOCAB.eos_id
        return out

    def loss_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Train on the answer digits and EOS only (read at ``=`` onwards).

        The paper trained on every token, but operand digits are uniformly random: their loss
        only teaches unigram frequencies, and dropping it makes CPU training converge sooner.
        """
        after_eq = torch.cumsum(ids == VOCAB.id_of("="), dim=1) > 0
        return after_eq & super().loss_mask(ids)

    def prompt_length(self, tokens: Tokens) -> int:
        return self.positions(tokens)["="] + 1

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        """Change one operand digit (keeping both operands 3-digit and the answer's length)."""
        toks = self.tokens(text, pad=False)
        a, b = operands(toks)
        for _ in range(10_000):
            which, k = rng.randrange(2), rng.randint(1, 3)
            old = (a, b)[which]
            d = rng.choice([x for x in range(10) if x != digit(old, k)])
            new = old + (d - digit(old, k)) * 10 ** (3 - k)
            if not LOW <= new <= HIGH:
                continue
            na, nb = (new, b) if which == 0 else (a, new)
            if len(str(na + nb)) == len(str(a + b)) and na + nb != a + b:
                return format_sum(na, nb)
        raise ValueError(f"no minimal edit found for {text!r}")

    def holds_fixed(self, features: Sequence[str], position: str | int | None = None) -> tuple[str, ...]:
        """The layout (the answer's length), and at an answer position A_k the answer digits A1..A_k the
        model has already been given there (teacher forcing), unless they are the features under test.

        The written digits are a function of the operands, and the site's downstream computation reads
        them: at A1 of a 3-digit sum, A1 = F1 + S1 + carry(2) tells the model carry(2). A source that
        writes another A1 gives a hybrid no input produces (operands that imply one carry, a digit that
        states another), so interchange would test that conflict instead of the features."""
        name = self.position_names[position] if isinstance(position, int) and 0 <= position < self.seq_len \
            else position
        written = ()
        if isinstance(name, str) and re.fullmatch(r"A[1-4]", name):
            written = tuple(f"A{k}" for k in range(1, int(name[1]) + 1))
        return (LAYOUT,) + tuple(a for a in written if a not in features)

    def fair_sources(self, text: str, rng: random.Random, n: int, hold: Sequence[str] = (LAYOUT,),
                     max_tries: int = 4000) -> list[str]:
        """Constructive: a column whose digit sum (or one of whose digits) is held keeps it, every other
        digit is drawn fresh; held answer digits (a prefix A1..A_k) draw the sum among those that start
        with them; the layout (answer length), carries and the rest are then held by rejection. Sources
        that agree on several column sums, or on a written prefix of the answer, are too rare for plain
        rejection sampling."""
        held = set(hold)
        columns = {f"{x}{k}" for k in (1, 2, 3) for x in ("F", "S")} | {f"F{k}+S{k}" for k in (1, 2, 3)}
        if not held & columns:
            prefix = 0
            while f"A{prefix + 1}" in held:
                prefix += 1
            if prefix:
                total = str(sum(operands(self.tokens(text, pad=False))))
                return self.sample_stratum(text, rng, n, hold, lambda r: _draw_with_prefix(r, total, prefix),
                                           max_tries)
            return super().fair_sources(text, rng, n, hold, max_tries)
        a, b = operands(self.tokens(text, pad=False))
        fa, fb = [digit(a, k) for k in (1, 2, 3)], [digit(b, k) for k in (1, 2, 3)]

        def draw(rng: random.Random) -> str | None:
            da, db = [], []
            for k in (1, 2, 3):
                lo = 1 if k == 1 else 0  # operands stay in [100, 999]
                keep_f, keep_s = f"F{k}" in held, f"S{k}" in held
                x = fa[k - 1] if keep_f else rng.randint(lo, 9)
                y = fb[k - 1] if keep_s else rng.randint(lo, 9)
                if f"F{k}+S{k}" in held and not (keep_f and keep_s):
                    total = fa[k - 1] + fb[k - 1]
                    if keep_s:
                        x = total - y
                    else:
                        x = x if keep_f else rng.choice([d for d in range(lo, 10) if lo <= total - d <= 9])
                        y = total - x
                da.append(x)
                db.append(y)
            if not all(0 <= d <= 9 for d in da + db) or 0 in (da[0], db[0]):
                return None
            return format_sum(int("".join(map(str, da))), int("".join(map(str, db))))

        return self.sample_stratum(text, rng, n, hold, draw, max_tries)

    def proxies(self, feature: str) -> tuple[str, ...]:
        """A column's digit sum correlates with either of its digits, which alone do not fix it."""
        for k in range(1, 4):
            if feature == f"F{k}+S{k}":
                return (f"F{k}", f"S{k}")
        return ()

    def task_features(self) -> list[Feature]:
        feats: list[Feature] = []
        for k in range(1, 4):
            feats.append(Feature(f"F{k}", lambda t, k=k: digit(operands(t)[0], k), f"digit {k} of the first operand",
                                 reads=(f"F{k}",)))
            feats.append(Feature(f"S{k}", lambda t, k=k: digit(operands(t)[1], k), f"digit {k} of the second operand",
                                 reads=(f"S{k}",)))
            feats.append(
                Feature(
                    f"F{k}+S{k}",
                    lambda t, k=k: digit(operands(t)[0], k) + digit(operands(t)[1], k),
                    f"sum of the column-{k} digits",
                )
            )
        for k in range(1, 4):
            feats.append(Feature(f"carry({k})", lambda t, k=k: carry(t, k), f"carry out of column {k}"))
        feats.append(Feature("sum", lambda t: sum(operands(t)), "a + b"))
        for k in range(1, 5):
            feats.append(
                Feature(
                    f"A{k}",
                    lambda t, k=k: int(str(sum(operands(t)))[k - 1]) if len(str(sum(operands(t)))) >= k else None,
                    f"answer digit {k}",
                )
            )
        return feats
