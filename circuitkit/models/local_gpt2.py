"""Find GPT-2 small on this machine (never download it) and explain where to put it if absent."""
from __future__ import annotations

import os
from pathlib import Path

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER = ("vocab.json", "merges.txt")
ENV_VAR = "CIRCUITKIT_GPT2_DIR"


def is_complete(d: Path) -> bool:
    """A directory with config.json, weights and the GPT-2 tokenizer files (or tokenizer.json)."""
    return ((d / "config.json").exists() and any((d / w).exists() for w in WEIGHTS)
            and (all((d / t).exists() for t in TOKENIZER) or (d / "tokenizer.json").exists()))


def hf_cache_dirs() -> list[Path]:
    """Snapshot directories of GPT-2 small in the local Hugging Face cache."""
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    out: list[Path] = []
    for repo in ("models--gpt2", "models--openai-community--gpt2"):
        out += sorted((root / repo / "snapshots").glob("*"))
    return out


def find_gpt2_small(explicit: str | None = None) -> Path | None:
    """The first complete GPT-2 small directory: ``explicit``, then $CIRCUITKIT_GPT2_DIR, then the HF cache."""
    cands = [Path(p).expanduser() for p in (explicit, os.environ.get(ENV_VAR)) if p] + hf_cache_dirs()
    return next((d for d in cands if d.is_dir() and is_complete(d)), None)


def missing_message(explicit: str | None = None) -> str:
    where = f"{explicit!r} is incomplete; " if explicit else ""
    return (f"GPT-2 small was not found locally ({where}circuitkit never downloads weights). To use it, put "
            f"config.json, model.safetensors (or pytorch_model.bin), vocab.json and merges.txt in one directory "
            f"and set [model] path in case_studies/ioi.toml or the environment variable {ENV_VAR} to it, or have "
            f"it in the Hugging Face cache (~/.cache/huggingface/hub/models--gpt2).")
