"""RASP programs from tracr's library, as ``circuitkit model from-tracr`` takes them (FILE.py:NAME): each function
returns the program with the vocabulary and the longest input it is compiled for."""
from tracr.compiler.lib import make_frac_prevs, make_hist, make_reverse, make_sort_unique
from tracr.rasp import rasp


def reverse() -> dict:
    """ACDC's tracr-reverse: the input backwards."""
    return {"program": make_reverse(rasp.tokens), "vocab": {1, 2, 3}, "max_seq_len": 5}


def frac_prevs() -> dict:
    """ACDC's tracr-proportion: the fraction of the tokens so far that are 'x' (a numerical output)."""
    return {"program": make_frac_prevs(rasp.tokens == "x"), "vocab": {"a", "b", "c", "x"}, "max_seq_len": 5}


def hist() -> dict:
    """How often each token occurs in the input (used by no case: the library check)."""
    return {"program": make_hist(), "vocab": {"a", "b", "c"}, "max_seq_len": 5}


def sort_unique() -> dict:
    """The input sorted (distinct tokens)."""
    return {"program": make_sort_unique(rasp.tokens, rasp.tokens), "vocab": {1, 2, 3, 4}, "max_seq_len": 4}
