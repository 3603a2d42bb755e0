"""Probed models: training, loading, evaluating and running them."""
from circuitkit.models.checkpoint import ProbedModel, load_probed, save_probed
from circuitkit.models.runner import ModelRunner

__all__ = ["ModelRunner", "ProbedModel", "load_probed", "save_probed"]
