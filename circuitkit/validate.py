"""Checks on what users hand circuitkit: numbers, devices, output paths, text encodings, weight files.

Every check raises ``CircuitkitError`` with one line that names what was wrong and what is valid, so
the CLI prints it and exits 2 instead of a traceback deep inside torch or json (issue 15).
"""
from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import Any

from circuitkit.errors import CircuitkitError

#: file suffixes holding tensors whose checksums a manifest records and whose integrity is checked
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")


# ---- numbers ------------------------------------------------------------------------------------
def check_range(name: str, value: float | int | None, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hint: str = "") -> None:
    """``value`` (the option ``name``) lies in [lo, hi] (``lo_open``: (lo, hi]); None means "not given".

    NaN and infinities are refused too: no option of circuitkit means anything at them.
    """
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise CircuitkitError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and value > hi
    if below or above:
        raise CircuitkitError(f"{name} must be {_range_text(lo, hi, lo_open)}{hint}, got {value}")


def _range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}]"


def check_positive(name: str, value: float | int | None) -> None:
    """``value`` > 0 (counts, budgets, widths, ε)."""
    check_range(name, value, 0, lo_open=True)


def check_threads(value: int | None, name: str = "--threads") -> None:
    """A torch CPU thread count: at least 1 (torch raises a bare RuntimeError otherwise)."""
    check_range(name, value, 1)


# ---- devices ------------------------------------------------------------------------------------
def check_device(device: str, name: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` with a CUDA device N present; returns it unchanged."""
    import torch

    valid = "valid: cpu, cuda, cuda:N"
    text = str(device).strip()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise CircuitkitError(f"unknown {name} {device!r}; {valid}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CircuitkitError(f"{name} {device} was requested but no CUDA device is available; use {name} cpu")
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise CircuitkitError(f"{name} {device}: there are only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return text


# ---- output paths -------------------------------------------------------------------------------
def _given_path(path: str | Path | None, name: str, kind: str) -> Path | None:
    """``path`` as a Path, None when not given; an empty one is named."""
    if path is not None and str(path).strip() == "":
        raise CircuitkitError(f"{name} is empty; give a {kind} path")
    return None if path is None else Path(path)


def check_out_file(path: str | Path | None, name: str = "--out") -> None:
    """``path`` can be written as a file: it is not a directory and no parent of it is a file."""
    p = _given_path(path, name, "file")
    if p is None:
        return
    if p.is_dir():
        raise CircuitkitError(f"{name} {str(p)!r} is an existing directory; give a file path (e.g. {p / 'out.json'})")
    _check_parents(p, name)


def check_out_dir(path: str | Path | None, name: str = "--out") -> None:
    """``path`` can be a directory: it is not an existing file and no parent of it is a file."""
    p = _given_path(path, name, "directory")
    if p is None:
        return
    if p.exists() and not p.is_dir():
        raise CircuitkitError(f"{name} {str(p)!r} is an existing file; give a directory path")
    _check_parents(p, name)


def _check_parents(p: Path, name: str) -> None:
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CircuitkitError(f"{name} {str(p)!r}: {str(parent)!r} is a file, not a directory")
            return


# ---- reading files ------------------------------------------------------------------------------
def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is a clear error."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CircuitkitError(f"{what} {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise CircuitkitError(f"{what} {str(p)!r} is a directory, not a file") from None
    except OSError as e:
        raise CircuitkitError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CircuitkitError(f"{what} {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                              "save it as UTF-8") from None


def read_json(path: str | Path, what: str = "JSON file", expect: type | None = dict) -> Any:
    """The parsed JSON of ``path`` (UTF-8), of type ``expect`` (default an object) unless None."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CircuitkitError(f"cannot read {what} {str(path)!r}: it is corrupt (not JSON: {e}); restore or "
                              "delete it") from None
    if expect is not None and not isinstance(obj, expect):
        raise CircuitkitError(f"{what} {str(path)!r} is corrupt: expected a JSON {expect.__name__}, "
                              f"got {type(obj).__name__}")
    return obj


def read_artifact(path: str | Path, what: str, made_by: str) -> dict:
    """The JSON object another circuitkit command wrote (``what``, e.g. "verification report"); a missing file
    names the command ``made_by`` that writes it."""
    p = Path(path)
    if not p.exists():
        raise CircuitkitError(f"{str(p)!r} does not exist; write it with '{made_by}'")
    obj = read_json(p, what, expect=None)
    if not isinstance(obj, dict):
        raise CircuitkitError(f"{str(p)!r} is not a {what} (not a JSON object)")
    return obj


# ---- weight files -------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(directory: str | Path) -> list[Path]:
    """The tensor files directly inside ``directory``, sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weight_checksums(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "bytes"}}`` for every tensor file in ``directory`` (for manifest.json)."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in weight_files(directory)}


def check_checksums(directory: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Each file that ``manifest.json``'s ``files`` records has that size and sha256.

    Catches weights changed under an intact header (bit rot, a bad copy, a hand edit); a
    directory whose manifest records no checksums passes.
    """
    d = Path(directory)
    if manifest is None:
        man_file = d / "manifest.json"
        if not man_file.exists():
            return
        manifest = read_json(man_file, "manifest")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return
    for name, rec in files.items():
        f = d / name
        if not isinstance(rec, dict) or not f.exists():
            continue  # a file the manifest lists but the directory no longer holds is judged by its loader
        if rec.get("bytes") is not None and f.stat().st_size != rec["bytes"]:
            raise CircuitkitError(f"{str(f)!r} has {f.stat().st_size} bytes but manifest.json records {rec['bytes']}: "
                                  "the file is truncated or was replaced; restore it from the original")
        if rec.get("sha256") and sha256_file(f) != rec["sha256"]:
            raise CircuitkitError(f"{str(f)!r} does not match the sha256 recorded in {str(d / 'manifest.json')!r}: "
                                  "the file is corrupt or was changed after it was written; restore it from the "
                                  "original (or, if you changed it on purpose, remove its entry under \"files\")")


def check_weight_file(path: str | Path) -> None:
    """A tensor file is whole: a torch zip archive passes its CRC checks, a safetensors file its header.

    Reads no pickle: a truncated or garbage file is refused before any loader sees it.
    """
    p = Path(path)
    if p.stat().st_size == 0:
        raise CircuitkitError(f"{str(p)!r} is empty (0 bytes); restore it or retrain")
    if p.suffix == ".safetensors":
        _check_safetensors(p)
    elif zipfile.is_zipfile(p):
        _check_zip(p)
    elif p.suffix == ".pt":
        raise CircuitkitError(f"{str(p)!r} is corrupt or truncated: not a torch archive; restore it or retrain")


def _check_zip(p: Path) -> None:
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CircuitkitError(f"{str(p)!r} is corrupt or truncated ({e}); restore it or retrain") from None
    if bad is not None:
        raise CircuitkitError(f"{str(p)!r} is corrupt: its entry {bad!r} fails the CRC check; restore it or retrain")


def _check_safetensors(p: Path) -> None:
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n).decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, AttributeError) as e:
        raise CircuitkitError(f"{str(p)!r} is not a valid safetensors file ({e}); restore it or retrain") from None
    if 8 + n + max(ends, default=0) != size:
        raise CircuitkitError(f"{str(p)!r} is truncated or has trailing bytes: the header describes "
                              f"{8 + n + max(ends, default=0)} bytes, the file has {size}; restore it or retrain")


def check_weight_dir(directory: str | Path) -> None:
    """Every tensor file in ``directory`` is whole and matches ``manifest.json``'s checksums, if any."""
    check_checksums(directory)
    for f in weight_files(directory):
        check_weight_file(f)
