"""Cached pipeline stages: each stage writes its artifacts into ``<run>/<stage>/`` atomically,
with ``stage.json`` recording a key of everything it depended on; a rerun with the same key
reuses the stage, so an interrupted run resumes at the first stage that did not finish.

A stage that checkpoints its own progress (decoder training) keeps it in a scratch directory beside the
stage (``.<stage>-<key>.partial``), outside the temporary directory the stage writes into, so that an
interrupted run resumes mid-stage; it is removed once the stage finishes.  Temporary directories that a
killed run left behind are removed when the next run takes the work directory's lock.

``stage.json`` also records the size and sha256 of every file the stage wrote; a cached stage is reused only
when all of them still match, so a truncated or altered cache file is named and recomputed, never trusted."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuitkit.io_utils import atomic_dir, atomic_write_json

StageFn = Callable[[Path], dict[str, Any]]
META = "stage.json"


@dataclass(frozen=True)
class Stage:
    """One node of a pipeline's stage graph: ``run(ctx, runner)`` returns the stage's summary (or None); it
    reads the results of the stages in ``needs`` only, and its cache key includes their keys."""

    name: str
    needs: tuple[str, ...]
    run: Callable[..., Any]


def stage_order(stages: list[Stage]) -> list[Stage]:
    """The stages in an order where each runs after everything it needs: the listed order, except that a stage
    listed before something it needs waits for it."""
    from graphlib import CycleError, TopologicalSorter

    by_name = {s.name: s for s in stages}
    for s in stages:
        unknown = [n for n in s.needs if n not in by_name]
        if unknown:
            raise ValueError(f"stage {s.name!r} needs unknown stage(s) {unknown}; stages: {', '.join(by_name)}")
    sorter = TopologicalSorter({s.name: s.needs for s in stages})
    try:
        sorter.prepare()
    except CycleError as e:
        raise ValueError(f"the stages need each other round a circle: {' -> '.join(e.args[1])}") from None
    order: list[Stage] = []
    while len(order) < len(stages):  # the first listed stage whose needs have run, each time
        done = {s.name for s in order}
        order.append(next(s for s in stages if s.name not in done and set(s.needs) <= done))
    return order


def fingerprint(directory: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under ``directory`` but ``stage.json``."""
    out: dict[str, list] = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != META:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[str(f.relative_to(directory))] = [f.stat().st_size, h.hexdigest()]
    return out


def cache_damage(directory: Path, meta: dict[str, Any]) -> str | None:
    """What makes a cached stage untrustworthy (a missing, truncated or changed file), or None."""
    files = meta.get("files")
    if not isinstance(files, dict):
        return "it records no checksums"
    now = fingerprint(directory)
    for rel, want in files.items():
        have = now.get(rel)
        if have is None:
            return f"{rel} is missing"
        if have[0] != want[0]:
            return f"{rel} has {have[0]} bytes, {want[0]} when written"
        if have[1] != want[1]:
            return f"{rel} changed since it was written (sha256)"
    return None


def _read_meta(meta_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The stage's metadata, or (None, why) when the file is not readable JSON with a key."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{META} is unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or "summary" not in meta:
        return None, f"{META} is not a stage record"
    return meta, None


def stage_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (configs and upstream stage keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs named stages under ``root``, reusing finished ones whose key matches."""

    root: Path
    log: Callable[[str], None] = print
    keys: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds each stage took when computed
    cached: list[str] = field(default_factory=list)  # stages reused from an earlier run

    pending: dict[str, str] = field(default_factory=dict)  # key of each stage while it runs
    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the stage graph's edges (``Stage.needs``)

    def run(self, name: str, key_parts: Any, fn: StageFn, depends: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The stage's summary: cached when its key (``key_parts`` and the keys of the stages it depends on:
        ``depends``, by default those it needs that cached a result) matches, else ``fn(tmp_dir)``'s."""
        if depends is None:
            depends = tuple(d for d in self.needs.get(name, ()) if d in self.keys)
        key = stage_key(key_parts, [self.keys[d] for d in depends])
        self.pending[name] = key
        d = self.root / name
        meta_file = d / META
        if meta_file.exists():
            meta, why = _read_meta(meta_file)
            if meta is not None and meta.get("key") == key:
                why = cache_damage(d, meta)
                if why is None:
                    self.log(f"[{name}] cached ({meta.get('seconds', 0):.0f} s when computed)")
                    self.keys[name], self.summaries[name] = key, meta["summary"]
                    self.timings[name] = meta.get("seconds", 0.0)
                    self.cached.append(name)
                    return meta["summary"]
            if why is not None:
                self.log(f"[{name}] the cached stage in {d} is damaged ({why}): recomputing it")
        self.log(f"[{name}] running ...")
        t0 = time.perf_counter()
        with atomic_dir(d, keep_existing=False) as tmp:
            summary = fn(tmp)
            secs = time.perf_counter() - t0
            atomic_write_json(tmp / META, {"key": key, "seconds": round(secs, 2), "summary": summary,
                                          "files": fingerprint(tmp)})
        for stale in self.root.glob(f".{name}-*.partial"):  # this run's progress, and any other config's
            shutil.rmtree(stale, ignore_errors=True)
        self.log(f"[{name}] done in {secs:.0f} s")
        self.keys[name], self.summaries[name], self.timings[name] = key, summary, secs
        return summary

    def path(self, name: str) -> Path:
        return self.root / name

    def scratch(self, name: str) -> Path:
        """Where the running stage ``name`` may keep progress that must survive an interruption (keyed by
        the stage's key, so a changed config never resumes another's progress)."""
        if name not in self.pending:
            raise RuntimeError(f"stage {name!r} is not running")
        return self.root / f".{name}-{self.pending[name]}.partial"


def remove_orphans(root: Path) -> list[str]:
    """Remove the temporary directories and files (``.*.tmp``, ``.*.old``) that a killed run left in
    ``root`` and its stage directories; call only while holding the work directory's lock."""
    removed = []
    for parent in [root, *[p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]]:
        for p in list(parent.glob(".*.tmp")) + list(parent.glob(".*.old")):
            (shutil.rmtree if p.is_dir() else Path.unlink)(p)
            removed.append(str(p.relative_to(root)))
    return removed
