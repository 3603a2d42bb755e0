"""Built-in tasks: tokenizers, splits, named positions, targets, contrasts, features."""
from __future__ import annotations

import random

import pytest

from circuitkit.errors import CircuitkitError
from circuitkit.tasks import get_task


@pytest.mark.parametrize("name", ["counting", "addition"])
def test_tokenizer_round_trip(name):
    task = get_task(name)
    for text in task.generate(random.Random(0), 200):
        ids = task.encode([text])[0]
        assert ids.shape == (task.seq_len,)
        assert task.decode(ids) == text
        assert task.tokenizer.decode(task.tokenizer.encode(text)) == text


def test_paper_vocabularies():
    c = get_task("counting").vocab
    assert c.tokens[:26] == tuple("abcdefghijklmnopqrstuvwxyz")
    assert [c.id_of(t) for t in "19|:BEP"] == [26, 34, 35, 36, 37, 38, 39]
    a = get_task("addition").vocab
    assert [a.id_of(t) for t in "09B+=EP"] == [0, 9, 10, 11, 12, 13, 14]


def test_addition_split_is_the_papers():
    task = get_task("addition")
    train, test = task.split("train"), task.split("test")
    assert (len(train), len(test)) == (607_500, 202_500)
    assert task.split("train") is train  # deterministic and cached
    assert not set(train[:5000]) & set(test)
    a, b = map(int, train[0][1:].split("=")[0].split("+"))
    assert 100 <= a <= 999 and 100 <= b <= 999


def test_counting_split_is_the_papers():
    task = get_task("counting")
    train, test = task.split("train"), task.split("test")
    assert (len(train), len(test)) == (1_170_000, 390_000)
    assert task.split("test")[:10] == test[:10]
    for text in test[:100]:
        toks = task.tokens(text)
        body = toks[1:toks.index("|")]
        assert len(set(body)) == 3 and str(body.count(toks[toks.index("|") + 1])) == toks[toks.index(":") + 1]


def test_unknown_split():
    with pytest.raises(CircuitkitError, match="valid: train, test"):
        get_task("addition").split("validation")


def test_counting_positions_and_target():
    task = get_task("counting")
    toks = task.tokens("Bvvzccvczvvvzvcvc|v:8E")
    pos = task.positions(toks)
    assert toks[pos["Q"]] == "v" and toks[pos[":"]] == ":" and toks[pos["ANS"]] == "8" and toks[pos["EOS"]] == "E"
    (tgt,) = task.targets(toks)
    assert tgt.position == pos[":"] and task.vocab.tokens[tgt.token] == "8"


def test_addition_positions_and_targets():
    task = get_task("addition")
    toks = task.tokens("B615+861=1476E")
    pos = task.positions(toks)
    assert [toks[pos[n]] for n in ("F1", "F2", "F3", "S1", "S2", "S3", "A1", "A2", "A3", "A4")] == list("6158611476")
    tg = {t.name: t for t in task.targets(toks)}
    assert tg["A1"].position == pos["="] and tg["A4"].position == pos["A3"] and tg["EOS"].position == pos["A4"]
    short = task.tokens("B100+100=200E")
    assert "A4" not in task.positions(short) and task.positions(short)["EOS"] == 12
    with pytest.raises(CircuitkitError, match="does not exist"):
        task.resolve_position("A4", short)


def test_addition_features():
    task = get_task("addition")
    f = task.features()
    toks = task.tokens("B615+861=1476E")
    assert (f["F2"](toks), f["S3"](toks), f["carry(3)"](toks), f["carry(2)"](toks), f["carry(1)"](toks)) == (1, 1, 0, 0, 1)
    assert f["A1"](toks) == 1 and f["tok@9"](toks) == "1"
    assert f["F1"](["B", "x"]) is None  # malformed inputs give None, not a crash


@pytest.mark.parametrize("name", ["counting", "addition"])
def test_contrasts_keep_length_and_change_answer(name):
    task = get_task(name)
    rng = random.Random(1)
    for text in task.generate(rng, 50):
        for other in (task.contrast_minimal(text, rng), task.contrast_random(text, rng)):
            a, b = task.tokens(text, pad=False), task.tokens(other, pad=False)
            assert len(a) == len(b) and other != text
        m = task.tokens(task.contrast_minimal(text, rng))
        # a minimal contrast changes the answer (for addition maybe not A1, but some answer digit)
        assert [t.token for t in task.targets(m)] != [t.token for t in task.targets(task.tokens(text))]


def test_bad_inputs():
    with pytest.raises(CircuitkitError, match="valid tasks: counting, addition, ioi"):
        get_task("sorting")
    with pytest.raises(CircuitkitError, match="not in the vocabulary"):
        get_task("counting").encode(["BabC|a:1E"])
    with pytest.raises(CircuitkitError, match="unknown position 'Z'"):
        get_task("counting").resolve_position("Z", get_task("counting").tokens("Bab|a:1E"))
    with pytest.raises(CircuitkitError, match="out of range"):
        get_task("addition").resolve_position(14, [])


def test_contrast_dispatches_to_the_papers_two_and_names_them_on_a_typo():
    task = get_task("addition")
    base = task.split("test")[0]
    assert task.contrast(base, "minimal", random.Random(3)) == task.contrast_minimal(base, random.Random(3))
    assert task.contrast(base, "random", random.Random(3)) == task.contrast_random(base, random.Random(3))
    with pytest.raises(CircuitkitError, match="unknown contrast 'flip'; valid: random, minimal"):
        task.contrast(base, "flip", random.Random(0))


def test_a_task_without_a_gpt2_form_says_so():
    with pytest.raises(CircuitkitError, match="no form in a pretrained GPT-2's tokens"):
        get_task("counting").with_pretrained_tokenizer("/nowhere")


def test_paired_inputs_skips_bases_without_a_source_and_draws_like_a_plain_loop():
    """The one pair builder: up to n bases from a draw of oversample × n test inputs, each with its source."""
    from circuitkit.patching.inputs import paired_inputs

    task = get_task("counting")
    make = lambda t, r: None if t.count(t[1]) > 4 else task.contrast_minimal(t, r)  # noqa: E731  (a maker that refuses some)
    bases, sources = paired_inputs(task, make, 30, random.Random(5), oversample=3)
    rng, want_b, want_s = random.Random(5), [], []
    for t in rng.sample(list(task.split("test")), 90):
        s = None if t.count(t[1]) > 4 else task.contrast_minimal(t, rng)
        if s is not None:
            want_b.append(t)
            want_s.append(s)
        if len(want_b) == 30:
            break
    assert (bases, sources) == (want_b, want_s) and 0 < len(bases) < 30  # the refused bases are skipped
    assert all(b.count(b[1]) <= 4 for b in bases)
    assert len(paired_inputs(task, task.contrast_minimal, 30, random.Random(5), oversample=3)[0]) == 30  # stops at n
