"""Activation patching: node, sweep, cumulative-group, path and attribution patching.

Naming: every function patches activations taken from a **source** (a paired input, a resample,
a mean or zeros) into the forward pass of a **base** input and reads a metric on the base's
answer.  TransformerLens's ``get_act_patch_*`` functions patch the *clean* cache into the
*corrupted* run: their corrupted tokens are our base, their clean cache is our source.
"""
from __future__ import annotations

from circuitkit.patching.ablations import ABLATIONS, Ablation
from circuitkit.patching.metrics import METRICS, MetricContext, metric_context
from circuitkit.patching.node import NodePatchResult, Patch, patch_nodes, run_with_patches
from circuitkit.patching.stats import Estimate, bootstrap_ci, estimate

__all__ = [
    "ABLATIONS", "Ablation", "METRICS", "MetricContext", "metric_context", "NodePatchResult", "Patch",
    "patch_nodes", "run_with_patches", "Estimate", "bootstrap_ci", "estimate",
]
