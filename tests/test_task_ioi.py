"""IOI task: tokenizer, split, named positions, targets, ABC corruption, features, GPT-2 adapter."""
from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from circuitkit.errors import CircuitkitError  # noqa: E402
from circuitkit.tasks import get_task  # noqa: E402
from circuitkit.tasks.ioi import (  # noqa: E402
    BASE_TEMPLATES,
    N_TEST,
    N_TRAIN,
    NAMES,
    OBJECTS,
    PLACES,
    SEQ_LEN,
    IOITask,
    _template_words,
    render,
)

BABA = "<bos> Then, John and Mary went to the store. John gave a drink to Mary <eos>"
ABBA = "<bos> Then, Mary and John went to the store. John gave a drink to Mary <eos>"


@pytest.fixture(scope="module")
def task() -> IOITask:
    return IOITask()


def test_registry_and_vocabulary(task: IOITask) -> None:
    assert isinstance(get_task("ioi"), IOITask)
    assert len(BASE_TEMPLATES) == 15 and len(NAMES) == 40 and len(PLACES) == 10 and len(OBJECTS) == 10
    assert len(set(NAMES)) == 40
    # fillers never collide with template words, so slots are found unambiguously
    assert not set(_template_words()) & set(NAMES + PLACES + OBJECTS)
    assert task.seq_len == SEQ_LEN == 21
    assert (task.vocab.bos, task.vocab.eos, task.vocab.pad) == ("<bos>", "<eos>", "<pad>")


def test_round_trip(task: IOITask) -> None:
    texts = task.generate(random.Random(0), 200) + [BABA, ABBA]
    ids = task.encode(texts)
    assert ids.shape == (len(texts), task.seq_len)
    for text, row in zip(texts, ids):
        assert text.startswith("<bos> ") and text.endswith(" <eos>")
        assert task.decode(row) == text
        assert task.tokenizer.decode(task.tokenizer.encode(text)) == text


def test_every_template_fits_and_has_both_families(task: IOITask) -> None:
    for t in range(len(BASE_TEMPLATES)):
        for fam in ("ABBA", "BABA"):
            toks = task.tokens(task.make_text(t, fam, "Mary", "John", "park", "book"))
            assert len(toks) == task.seq_len
            assert task._parse(toks).family == fam
            assert task.task_features()[-1](toks) == t  # "template"


def test_split_deterministic_and_disjoint(task: IOITask) -> None:
    train, test = task.split("train"), task.split("test")
    assert train == task.split("train") and test == task.split("test")
    assert len(train) == N_TRAIN == len(set(train)) and len(test) == N_TEST == len(set(test))
    assert not set(train) & set(test)

    def combo(text: str) -> tuple[int, frozenset[str]]:
        p = task._parse(task.tokenizer.split(text))
        return p.layout.template, frozenset((p.n1, p.n2))

    train_combos = {combo(x) for x in train[:20_000]}
    assert not train_combos & {combo(x) for x in test}
    with pytest.raises(CircuitkitError, match="valid: train, test"):
        task.split("validation")


@pytest.mark.parametrize(
    "text, family, io_pos, s1_pos",
    [(BABA, "BABA", 5, 3), (ABBA, "ABBA", 3, 5)],
)
def test_named_positions(task: IOITask, text: str, family: str, io_pos: int, s1_pos: int) -> None:
    toks = task.tokens(text)
    pos = task.positions(toks)
    assert pos["BOS"] == 0 and toks[0] == "<bos>"
    assert pos["IO"] == io_pos and toks[pos["IO"]] == "Mary"
    assert pos["S1"] == s1_pos and toks[pos["S1"]] == "John"
    assert pos["S1+1"] == s1_pos + 1
    assert toks[pos["S2"]] == "John" and pos["S2"] == 11
    assert toks[pos["END"]] == "to" and toks[pos["END"] + 1] == "Mary"
    assert toks[pos["EOS"]] == "<eos>"
    assert task.resolve_position("END", toks) == pos["END"]
    feats = task.features()
    assert feats["IO"](toks) == "Mary" and feats["S"](toks) == "John"
    assert feats["ABBA_or_BABA"](toks) == family
    assert feats["IO_first"](toks) == (family == "ABBA")
    assert feats["place"](toks) == "store" and feats["object"](toks) == "drink"


def test_targets_and_loss_mask(task: IOITask) -> None:
    toks = task.tokens(BABA)
    (target,) = task.targets(toks)
    assert target == task.target(toks)
    assert target.name == "IO" == task.default_target
    assert target.position == task.positions(toks)["END"]
    assert target.token == task.vocab.id_of("Mary") and target.wrong == task.vocab.id_of("John")
    assert task.prompt_length(toks) == target.position + 1

    texts = task.generate(random.Random(1), 50)
    ids = task.encode(texts)
    mask = task.loss_mask(ids)
    for text, row in zip(texts, mask):
        assert row.nonzero().flatten().tolist() == [task.targets(task.tokens(text))[0].position]


def test_abc_corruption(task: IOITask) -> None:
    rng = random.Random(2)
    for text in task.generate(random.Random(3), 100) + [BABA, ABBA]:
        toks = task.tokens(text)
        pos = task.positions(toks)
        abc = task.corrupt_abc(text, rng)
        new = task.tokens(abc)
        assert len(task.tokens(abc, pad=False)) == len(task.tokens(text, pad=False))
        slots = [pos["IO"], pos["S1"], pos["S2"]]
        assert len({new[i] for i in slots}) == 3
        assert all(new[i] in NAMES and new[i] not in (toks[pos["IO"]], toks[pos["S1"]]) for i in slots)
        changed = {i for i, (a, b) in enumerate(zip(toks, new)) if a != b}
        assert changed == set(slots) | {pos["END"] + 1}
        assert new[pos["END"] + 1] == new[pos["IO"]]
        # no repeated name: IO and S1 are undefined, the answer slot still resolves
        assert "IO" not in task.positions(new) and task.positions(new)["END"] == pos["END"]
        assert task.features()["IO"](new) is None
        assert task.features()["place"](new) == task.features()["place"](toks)
    assert task.contrast_minimal(BABA, random.Random(4)) == task.corrupt_abc(BABA, random.Random(4))
    other = task.contrast_random(BABA, random.Random(5))
    assert other != BABA and len(task.tokens(other, pad=False)) == len(task.tokens(BABA, pad=False))


def test_features_are_none_on_malformed_tokens(task: IOITask) -> None:
    feats = task.task_features()
    toks = task.tokens(BABA)
    bad_inputs = [
        [],
        ["<pad>"] * task.seq_len,
        toks[1:],  # no BOS
        toks[:8],  # truncated
        ["<bos>", "Mary", "Mary", "to", "<eos>"],
        [t if t != "store" else "Mary" for t in toks],  # a name where the place belongs
        ["<bos>", "not", "even", "vocabulary", 3],
    ]
    for bad in bad_inputs:
        for f in feats:
            assert f(bad) is None, (f.name, bad)
        assert set(task.positions(bad)) <= {"BOS"}
        with pytest.raises(CircuitkitError):
            task.targets(bad)
    with pytest.raises(CircuitkitError, match="not an IOI prompt"):
        task.corrupt_abc("<bos> Then, Mary and John went to the store. Kate gave a drink to Mary <eos>", random.Random(0))


def test_unknown_word_is_named(task: IOITask) -> None:
    with pytest.raises(CircuitkitError, match="Zorblax"):
        task.encode(["<bos> Then, Zorblax and John went to the store. John gave a drink to Zorblax <eos>"])
    with pytest.raises(CircuitkitError, match="unknown IOI tokenizer 'bpe'"):
        IOITask(tokenizer="bpe")


def test_missing_gpt2_tokenizer_dir(tmp_path) -> None:
    with pytest.raises(CircuitkitError, match="tokenizer_dir") as err:
        IOITask(tokenizer="gpt2")
    assert "vocab.json" in str(err.value)
    for missing in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(CircuitkitError) as err:
            IOITask(tokenizer="gpt2", tokenizer_dir=missing)
        msg = str(err.value)
        assert str(missing) in msg and "vocab.json" in msg and "merges.txt" in msg and "tokenizer.json" in msg


# ---- the GPT-2 adapter, on a tiny byte-level BPE trained here -------------------------------
LEFT_OUT = ("Victoria", "Andrew")  # never in the tokenizer's corpus, so not single tokens


@pytest.fixture(scope="module")
def gpt2_task(tmp_path_factory) -> IOITask:
    tokenizers = pytest.importorskip("tokenizers")
    rng = random.Random(0)
    names = [n for n in NAMES if n not in LEFT_OUT]
    corpus = [
        render(t, fam, *rng.sample(names, 2), place, obj)
        for t in range(len(BASE_TEMPLATES))
        for fam in ("ABBA", "BABA")
        for place in PLACES
        for obj in OBJECTS
    ]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=800, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    out = tmp_path_factory.mktemp("gpt2tok")
    bpe.save_model(str(out))  # vocab.json + merges.txt, as in a GPT-2 checkpoint
    return IOITask(tokenizer="gpt2", tokenizer_dir=out)


def test_gpt2_adapter(gpt2_task: IOITask) -> None:
    task = gpt2_task
    vocab = task.vocab
    assert vocab.bos == vocab.eos == vocab.pad == "<|endoftext|>" and len(vocab.special_ids) == 1
    assert task.tokenizer.hf.convert_tokens_to_ids(list(vocab.tokens[:50])) == list(range(50))
    assert set(task.names) == set(NAMES) - set(LEFT_OUT)
    assert task.places == PLACES and task.objects == OBJECTS
    for name in task.names:
        assert len(task.tokenizer.split(" " + name)) == 1

    texts = task.generate(random.Random(0), 50)
    ids = task.encode(texts)
    assert ids.shape == (50, task.seq_len)
    text = texts[0]
    assert text.startswith("<|endoftext|>") and not text.endswith("<|endoftext|>")
    for t, row in zip(texts, ids):
        assert task.decode(row) == t

    toks = task.tokens(text)
    pos = task.positions(toks)
    feats = task.features()
    io, s = feats["IO"](toks), feats["S"](toks)
    assert io in task.names and s in task.names and io != s
    assert task.tokenizer.join([toks[pos["IO"]]]) == " " + io
    assert task.tokenizer.join([toks[pos["S1"]]]) == task.tokenizer.join([toks[pos["S2"]]]) == " " + s
    assert task.tokenizer.join([toks[pos["END"]]]) == " to"
    (target,) = task.targets(toks)
    assert target.token == task.tokenizer.hf.convert_tokens_to_ids(task.tokenizer.split(" " + io))[0]
    assert target.wrong == vocab.id_of(toks[pos["S1"]])
    mask = task.loss_mask(ids)
    assert mask.sum().item() == 50 and bool(mask[0, pos["END"]])

    abc = task.corrupt_abc(text, random.Random(1))
    assert len(task.tokens(abc, pad=False)) == len(task.tokens(text, pad=False))
    assert "IO" not in task.positions(task.tokens(abc))
    assert task.describe()["tokenizer"] == "gpt2"

    train, test = task.split("train"), task.split("test")
    assert len(train) == N_TRAIN and len(test) == N_TEST and not set(train[:1000]) & set(test)
    assert torch.equal(task.special_positions(ids)[:, 0], torch.ones(50, dtype=torch.bool))
