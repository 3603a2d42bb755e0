"""Run manifests: seed, config, package versions and git commit stored next to every artifact."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from circuitkit.io_utils import atomic_write_json

PACKAGES = ("circuitkit", "torch", "transformer-lens", "transformers", "numpy", "scipy", "networkx")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the circuitkit checkout this code runs from (with '+dirty' if modified)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_manifest(kind: str, seed: int | None, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Everything needed to reproduce an artifact."""
    return {
        "kind": kind,
        "seed": seed,
        "config": config,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def write_manifest(directory: str | Path, kind: str, seed: int | None, config: dict[str, Any], **extra: Any) -> dict:
    """Write ``manifest.json`` into ``directory``, with the sha256 and size of every tensor file already
    there under ``files`` (loaders check them: weights changed under an intact header are refused)."""
    from circuitkit.validate import weight_checksums

    man = build_manifest(kind, seed, config, **extra)
    files = weight_checksums(directory)
    if files:
        man["files"] = files
    atomic_write_json(Path(directory) / "manifest.json", man)
    return man
