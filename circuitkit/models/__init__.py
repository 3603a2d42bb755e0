"""Probed models: training, loading, evaluating and running them."""
from circuitkit.models.checkpoint import ProbedModel, load_probed, save_probed
from circuitkit.models.runner import GPT2Runner

__all__ = ["GPT2Runner", "ProbedModel", "load_probed", "save_probed"]
