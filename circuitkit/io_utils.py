"""Atomic writes (artifacts appear whole or not at all: write to a temp path, then rename) and safe reads
(tensor checkpoints load without unpickling arbitrary objects)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from circuitkit.errors import CircuitkitError


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with the path it concerns (a failed write names none: "File too large", "No space left")."""
    return e if e.filename is not None else OSError(e.errno, e.strerror, str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``; a failed write
    (a full disk) leaves ``path`` as it was and raises an ``OSError`` naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _named(e, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temp file, so an interrupted save never corrupts a checkpoint."""
    buf = io.BytesIO()  # serialised in memory: torch's own writer reports a full disk as a RuntimeError
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep_existing: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` (with
    ``keep_existing``, files already in ``path`` that the block did not rewrite are carried
    over), on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            for item in path.iterdir() if keep_existing else ():
                target = tmp / item.name
                if not target.exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def safe_torch_load(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, dicts, lists, tuples and plain numbers only.

    A file a user hands over may be a crafted pickle that runs code when loaded; it is refused here, as is a
    truncated or garbage file, each with one clear message naming ``what`` the file should have been."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln] or str(e).splitlines()[:1]
        raise CircuitkitError(
            f"refusing to load {what} {str(path)!r}: it is not a plain tensor checkpoint. It holds Python objects "
            f"other than tensors, numbers and containers, which could run code when unpickled, or it is no "
            f"checkpoint at all ({lines[0][:160] if lines else 'unreadable'}). circuitkit writes only plain tensor "
            "checkpoints: recreate the file with circuitkit") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CircuitkitError(f"{what} {str(path)!r} is truncated or not a torch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'empty'}); "
                              "delete it and recreate it") from None
