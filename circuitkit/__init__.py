"""circuitkit: InversionView decoders and causal circuit verification for transformers."""
from __future__ import annotations

__version__ = "0.1.0"

from circuitkit.errors import CircuitkitError

__all__ = ["CircuitkitError", "__version__"]
