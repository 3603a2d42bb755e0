"""Fixture helpers for the bad-input suite: damaged copies of good checkpoints and files.

Each helper copies or edits files in a temporary directory; none touches the committed models.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

NON_UTF8 = b"\xff\xfe{\x80 not utf-8 \xc3\x28"


def copy_dir(src: str | Path, dst: Path) -> Path:
    """A fresh copy of directory ``src`` at ``dst`` (replaced if present)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: object) -> None:
    """Set keys of a JSON object file (e.g. ``n_layer=3`` in config.json)."""
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def truncate(path: Path, keep: float = 0.5) -> None:
    """Keep the first ``keep`` fraction of a file's bytes (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def scramble_tail(path: Path, n: int = 2000) -> None:
    """Flip bits in the last ``n`` bytes (tensor data), leaving any header at the start intact."""
    data = bytearray(path.read_bytes())
    for i in range(max(0, len(data) - n), len(data) - 16):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def garbage(path: Path, n: int = 4096) -> None:
    """Replace a file by deterministic non-tensor bytes of the same kind of size."""
    path.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(n)))


def non_utf8(path: Path) -> None:
    """Replace a text file by bytes that are not UTF-8."""
    path.write_bytes(NON_UTF8)


def drop_checksums(directory: Path) -> None:
    """Remove manifest.json's recorded checksums (a checkpoint from before they were written)."""
    man = directory / "manifest.json"
    if man.exists():
        obj = json.loads(man.read_text())
        obj.pop("files", None)
        man.write_text(json.dumps(obj))


def nan_weights(directory: Path) -> None:
    """Write one NaN into the token embedding of ``model.safetensors`` (no checksum to catch it)."""
    from safetensors.torch import load_file, save_file

    f = directory / "model.safetensors"
    state = load_file(str(f))
    state["transformer.wte.weight"][0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    drop_checksums(directory)
