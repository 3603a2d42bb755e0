"""Cached pipeline stages: each stage writes its artifacts into ``<run>/<stage>/`` atomically,
with ``stage.json`` recording a key of everything it depended on; a rerun with the same key
reuses the stage, so an interrupted run resumes at the first stage that did not finish."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from circuitkit.io_utils import atomic_dir, atomic_write_json

StageFn = Callable[[Path], dict[str, Any]]


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

    def run(self, name: str, key_parts: Any, fn: StageFn, depends: tuple[str, ...] = ()) -> dict[str, Any]:
        key = stage_key(key_parts, [self.keys[d] for d in depends])
        d = self.root / name
        meta_file = d / "stage.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta.get("key") == key:
                self.log(f"[{name}] cached ({meta.get('seconds', 0):.0f} s when computed)")
                self.keys[name], self.summaries[name] = key, meta["summary"]
                self.timings[name] = meta.get("seconds", 0.0)
                self.cached.append(name)
                return meta["summary"]
        self.log(f"[{name}] running ...")
        t0 = time.perf_counter()
        with atomic_dir(d, keep_existing=False) as tmp:
            summary = fn(tmp)
            secs = time.perf_counter() - t0
            atomic_write_json(tmp / "stage.json", {"key": key, "seconds": round(secs, 2), "summary": summary})
        self.log(f"[{name}] done in {secs:.0f} s")
        self.keys[name], self.summaries[name], self.timings[name] = key, summary, secs
        return summary

    def path(self, name: str) -> Path:
        return self.root / name
