"""Consent before running a task file: the user's allowlist of task files, by sha256.

A task file is Python code.  A file the user names on the command line (``--task FILE.py:Class``,
``model train FILE.py:Class``, a case TOML's ``task``) is trusted, and its sha256 goes into
``trusted_tasks.json`` under the user's cache directory (``$CIRCUITKIT_CACHE_DIR``, else the
platform's user cache, e.g. ``~/.cache/circuitkit``).  A task file that an *artefact* names (a
checkpoint's ``circuitkit.json``, a decoder, a hypotheses file) runs only if its current content is on
that list, or if the user passes ``--trust-task`` for this one command: a directory someone hands you
cannot make circuitkit run code it ships or names.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from circuitkit.errors import CircuitkitError

#: environment variable that moves the cache directory (tests point it at a temporary folder)
CACHE_ENV = "CIRCUITKIT_CACHE_DIR"
ALLOWLIST_FILE = "trusted_tasks.json"

#: set by ``--trust-task`` for one command: task files that artefacts name run without prior consent
_TRUST_RECORDED: ContextVar[bool] = ContextVar("circuitkit_trust_recorded_task_files", default=False)


def cache_dir() -> Path:
    """The user's circuitkit cache directory (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("circuitkit", appauthor=False))


def allowlist_path() -> Path:
    return cache_dir() / ALLOWLIST_FILE


def _read() -> dict[str, dict[str, str]]:
    """sha256 -> {path, trusted_at}; a missing file is an empty list, a damaged one an error naming it."""
    path = allowlist_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CircuitkitError(f"the trusted-task list {str(path)!r} is damaged ({type(e).__name__}: {e}); delete it "
                              "and name your task files again with --task FILE.py:Class") from None
    return {str(k): v for k, v in files.items() if isinstance(v, dict)}


def is_trusted(sha256: str) -> bool:
    """Whether the user named a task file with this content on this machine before."""
    return sha256 in _read()


def trust(file: Path, sha256: str) -> None:
    """Record that the user named ``file`` (content ``sha256``) themselves; idempotent, atomic."""
    from filelock import FileLock

    from circuitkit.io_utils import atomic_write_json

    if sha256 in _read():
        return
    path = allowlist_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):  # two commands trusting at once both keep their entry
            files = _read()
            files.setdefault(sha256, {"path": str(file), "trusted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            atomic_write_json(path, {"version": 1, "files": files})
    except OSError as e:  # a read-only home must not stop the user's own command; the file simply is not remembered
        import warnings

        warnings.warn(f"could not record trusted task file in {str(path)!r}: {e}", stacklevel=2)


def recorded_files_trusted() -> bool:
    """Whether ``--trust-task`` is in force for the current command."""
    return _TRUST_RECORDED.get()


@contextlib.contextmanager
def trusting_recorded_files(enabled: bool = True) -> Iterator[None]:
    """Within the block, task files that artefacts name run (and join the allowlist): ``--trust-task``."""
    token = _TRUST_RECORDED.set(enabled)
    try:
        yield
    finally:
        _TRUST_RECORDED.reset(token)
