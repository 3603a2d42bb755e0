"""Activation patching: node, sweep, cumulative-group, path and attribution patching.

Naming: every function patches activations taken from a **source** (a paired input, a resample,
a mean or zeros) into the forward pass of a **base** input and reads a metric on the base's
answer.  TransformerLens's ``get_act_patch_*`` functions patch the *clean* cache into the
*corrupted* run: their corrupted tokens are our base, their clean cache is our source.

    patch_nodes(pm, base, ["a1.0@:"], source=src)            node patching (any sites, all at once)
    sweep(pm, base, "head", source=src)                     every layer x position x head, batched
    cumulative_patch(pm, base, src, groups)                 the paper's forward/backward tables
    path_patch(pm, base, src, "a0.1@6", "a1.2", "v")       sender -> receiver input only
    attribute(pm, base, src)                                gradient screen of all nodes and edges

Each of them describes its change as interventions (``engine.Patch``, ``engine.Blend``, ...) and calls
``engine.run(model, base, interventions, metric)``, the one place hooks are made.
"""
from __future__ import annotations

from circuitkit.patching import engine
from circuitkit.patching.ablations import ABLATIONS, Ablation, build_patches
from circuitkit.patching.attribution import AttributionResult, attribute
from circuitkit.patching.engine import Blend, Patch, Record
from circuitkit.patching.groups import CumulativeResult, Group, cumulative_patch
from circuitkit.patching.metrics import METRICS, MetricContext, metric_context
from circuitkit.patching.node import NodePatchResult, interchange_logits, patch_nodes, run_with_patches
from circuitkit.patching.path import Receiver, path_patch, path_patch_to_site
from circuitkit.patching.sweep import SWEEP_KINDS, SweepResult, sweep
from circuitkit.stats import Estimate, bootstrap_ci, estimate

__all__ = [
    "ABLATIONS", "Ablation", "Blend", "Patch", "Record", "engine", "build_patches", "AttributionResult", "attribute", "CumulativeResult",
    "Group", "cumulative_patch", "METRICS", "MetricContext", "metric_context", "NodePatchResult", "interchange_logits", "patch_nodes",
    "run_with_patches", "Receiver", "path_patch", "path_patch_to_site", "Estimate", "bootstrap_ci", "estimate", "SWEEP_KINDS",
    "SweepResult", "sweep",
]
