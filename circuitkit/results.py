"""What every result type shares: a JSON form.  Result classes (patching, inversion, hypotheses,
verification, circuits, case runs) are dataclasses with ``to_dict()``; the ``JsonResult`` mixin adds
``to_json()`` so a notebook user can save or diff any of them the same way."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(x: Any) -> Any:
    """NaN -> None, numpy scalars -> Python numbers, tuples -> lists, paths -> strings (JSON-safe)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and x != x:
        return None
    return x


class JsonResult:
    """Mixin for result dataclasses that define ``to_dict()``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text (NaN written as null)."""
        return json.dumps(to_jsonable(self.to_dict()), indent=indent, default=str)

    def save_json(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` atomically (a temp file renamed into place)."""
        from circuitkit.io_utils import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")
        return Path(path)


class SettingsRecord(JsonResult):
    """Mixin for settings dataclasses (thresholds, rules): the JSON form is every field, as written."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses
