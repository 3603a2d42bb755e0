"""A task whose mechanism is forced by construction, and a hand-set model that implements it.

Task: ``B x1 x2 x3 x4 = y E`` with letters x_i from ``abcdefgh``; the answer y (read at ``=``)
is x2, the token at absolute position 2.  Model: one layer, one head, d_model = vocab + positions,
one-hot embeddings; the head attends from every position to position 2 and copies its token into
the residual stream; the MLP is exactly zero.  So the only information path to the answer is
head a0.0 at ``=`` carrying ``tok@2``; a0.0 at positions 3 and 4 carries the same token but never
reaches the answer.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.train import as_probed
from circuitkit.tasks.base import CharTokenizer, Feature, Target, Task, Tokens, Vocabulary

LETTERS = "abcdefgh"
VOCAB = Vocabulary(tuple(LETTERS + "B=EP"), bos="B", eos="E", pad="P")


class CopyTask(Task):
    name = "copy2"
    seq_len = 8
    position_names = ("BOS", "X1", "X2", "X3", "X4", "=", "ANS", "EOS")
    default_target = "copy"

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer(VOCAB)

    def generate(self, rng: random.Random, n: int) -> list[str]:
        out = []
        for _ in range(n):
            xs = [rng.choice(LETTERS) for _ in range(4)]
            out.append("B" + "".join(xs) + "=" + xs[1] + "E")
        return out

    def split(self, which: str) -> Sequence[str]:
        self.check_split_name(which)
        return self.generate(random.Random(0 if which == "train" else 1), 2000)

    def positions(self, tokens: Tokens) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.position_names)}

    def targets(self, tokens: Tokens) -> list[Target]:
        return [Target("copy", 5, VOCAB.id_of(tokens[6]))]

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        xs = list(text[1:5])
        xs[1] = rng.choice([c for c in LETTERS if c != xs[1]])
        return "B" + "".join(xs) + "=" + xs[1] + "E"

    def task_features(self) -> list[Feature]:
        return [Feature("n_distinct", lambda t: len(set(t[1:5])), "distinct letters among x1..x4")]

    def proxies(self, feature: str) -> tuple[str, ...]:
        return ("n_distinct",) if feature == "tok@2" else ()


class EchoTask(CopyTask):
    """``B x1 x2 x3 x4 x4 E``: at x4 the model must predict x4 again — its own token.  Any GPT-2 with tied
    embeddings does this from the embedding alone, trained or not: the claim is architectural."""

    name = "echo4"
    seq_len = 7
    position_names = ("BOS", "X1", "X2", "X3", "X4", "ANS", "EOS")
    default_target = "echo"

    def generate(self, rng: random.Random, n: int) -> list[str]:
        out = []
        for _ in range(n):
            xs = [rng.choice(LETTERS) for _ in range(4)]
            out.append("B" + "".join(xs) + xs[3] + "E")
        return out

    def targets(self, tokens: Tokens) -> list[Target]:
        return [Target("echo", 4, VOCAB.id_of(tokens[5]))]

    def contrast_minimal(self, text: str, rng: random.Random) -> str:
        x4 = rng.choice([c for c in LETTERS if c != text[4]])
        return text[:4] + x4 + x4 + "E"

    def proxies(self, feature: str) -> tuple[str, ...]:
        return ()


def _one_hot_gpt2(V: int, S: int, d: int, n_heads: int):
    """A 1-layer GPT-2 with every weight zero except one-hot token and position embeddings and unit LNs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=S, n_embd=d, n_layer=1, n_head=n_heads, activation_function="gelu_new",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=VOCAB.bos_id, eos_token_id=VOCAB.eos_id, pad_token_id=VOCAB.pad_id)
    m = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        tr = m.transformer
        tr.wte.weight[:, :V] = torch.eye(V)  # token one-hot (also the tied unembedding)
        tr.wpe.weight[:, V:V + S] = torch.eye(S)  # position one-hot
        for ln in (tr.h[0].ln_1, tr.h[0].ln_2, tr.ln_f):
            ln.weight.fill_(1.0)
    return m


def echo_model(task: EchoTask | None = None) -> ProbedModel:
    """Embeddings only (attention and MLP exactly zero): at every position it predicts its own token."""
    task = task or EchoTask()
    V, S = len(VOCAB), task.seq_len
    return as_probed(_one_hot_gpt2(V, S, V + S, 1), task)


def copy_model(task: CopyTask | None = None, n_heads: int = 1) -> ProbedModel:
    """The hand-set one-layer model (exactly 100% accurate on the task).

    With ``n_heads`` > 1 every head copies x2 equally (redundant carriers): patching fewer than half of
    them from another input leaves the answer alone; patching more than half flips it.
    """
    task = task or CopyTask()
    V, S = len(VOCAB), task.seq_len
    hd = max(V, -(-(V + S) // n_heads))  # head width: holds a token one-hot; heads together hold V + S
    d = n_heads * hd
    m = _one_hot_gpt2(V, S, d, n_heads)
    with torch.no_grad():
        tr = m.transformer
        blk = tr.h[0]
        W = blk.attn.c_attn.weight  # [d, 3d]: Q | K | V, each split into heads of width hd
        b = blk.attn.c_attn.bias
        for h in range(n_heads):
            o = h * hd
            b[o] = 30.0  # every query is the same vector along the head's dim 0 ...
            W[V + 2, d + o] = 1.0  # ... and only the key at position 2 points along it
            for i in range(V):
                W[i, 2 * d + o + i] = 1.0  # values: the token one-hot
            blk.attn.c_proj.weight[o:o + V, :V] = 5.0 * torch.eye(V)  # write the copied token, loudly
        # MLP weights stay zero: its output is exactly 0
    return as_probed(m, task)
