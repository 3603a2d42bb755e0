"""User-facing errors: one exception type the CLI turns into a clear message and exit code 2."""
from __future__ import annotations

from collections.abc import Iterable


class CircuitkitError(Exception):
    """An error caused by the user's input (bad name, missing file, wrong shape), not a bug."""


def choices_hint(valid: Iterable[object], limit: int = 40) -> str:
    """Format the valid choices for an error message, truncating very long lists."""
    items = [str(v) for v in valid]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown
