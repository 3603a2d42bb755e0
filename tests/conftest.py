"""Shared fixtures: tasks and tiny probed models trained once per test session (offline)."""
from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# the trusted-task list and other per-user state live in a folder of this session, never the user's cache
os.environ["CIRCUITKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="circuitkit-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from circuitkit.models.checkpoint import ProbedModel, load_probed  # noqa: E402
from circuitkit.models.train import TrainConfig, train_probed  # noqa: E402
from circuitkit.tasks import get_task  # noqa: E402


@pytest.fixture(scope="session")
def counting_task():
    return get_task("counting")


@pytest.fixture(scope="session")
def addition_task():
    return get_task("addition")


def _train_tiny(tmp_path_factory, task_name: str, **kw) -> ProbedModel:
    task = get_task(task_name)
    out = tmp_path_factory.mktemp(f"{task_name}_model") / "ckpt"
    cfg = TrainConfig(**{"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup": 20, "eval_limit": 500,
                         "checkpoint_every": 100, **kw})
    train_probed(task, out, cfg, progress=False)
    return load_probed(out)


@pytest.fixture(scope="session")
def tiny_counting_model(tmp_path_factory) -> ProbedModel:
    """The paper's counting architecture (2L, 1H, d64), briefly trained: real weights, fast."""
    return _train_tiny(tmp_path_factory, "counting", n_layer=2, n_head=1, d_model=64)


@pytest.fixture(scope="session")
def tiny_addition_model(tmp_path_factory) -> ProbedModel:
    """The paper's addition architecture (2L, 4H, d32), briefly trained."""
    return _train_tiny(tmp_path_factory, "addition", n_layer=2, n_head=4, d_model=32)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """``bin/`` of a fresh virtual environment, outside the checkout, holding circuitkit installed from a
    wheel built from this repository (package data included).  Its dependencies are this environment's
    (a .pth line), so nothing is downloaded; circuitkit itself comes only from the wheel."""
    import shutil
    import site
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("wheel")
    repo, src = Path(__file__).resolve().parents[1], root / "src"  # built from a copy: the checkout stays clean
    for name in ("circuitkit", "case_studies"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist")], check=True, cwd=root)
    (wheel,) = (root / "dist").glob("circuitkit-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    (venv_site,) = (root / "venv" / "lib").glob("python3*/site-packages")
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, cwd=root)
    return bin_dir


# ---- a prompt-pairs model: a tiny random GPT-2 with its own HF tokenizer, and a JSONL of IOI-style pairs ----
NAMES = ["Mary", "John", "Alice", "Bob", "Sara", "Tom", "Anna", "Paul", "Lea"]
PLACES = ["store", "park", "school"]
OBJECTS = ["drink", "book", "ball"]
WORDS = ["When", "and", "went", "to", "the", "gave", "a", ","]


def _row(io: str, s: str, place: str, obj: str) -> dict:
    template = "When [IO:{io}] and [S:{s}] went to the [PLACE:{place}], [S2:{s2}] gave a [OBJ:{obj}] to"
    return {"prompt": template.format(io=io, s=s, s2=s, place=place, obj=obj), "answer": f" {io}",
            "counterfactual": template.format(io=io, s=s, s2=io, place=place, obj=obj), "counterfactual_answer": f" {s}"}


@pytest.fixture(scope="session")
def pairs_model(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers with its tokenizer, and a 60-row prompt-pairs file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pairs")
    vocab = ["<|endoftext|>", "When", ","] + [f"Ġ{w}" for w in WORDS[1:-1] + NAMES + PLACES + OBJECTS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    model_dir = root / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(model_dir)
    config = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    rng = random.Random(0)
    combos = [(io, s) for io, s in itertools.permutations(NAMES, 2)]
    rows = [_row(io, s, rng.choice(PLACES), rng.choice(OBJECTS)) for io, s in rng.sample(combos, 60)]
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir, jsonl
