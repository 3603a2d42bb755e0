"""Null controls that run beside every real verification and must verify nothing.

* ``random_model``: the same tests (same inputs, pairs and features) on a randomly initialised
  model of the same architecture (``circuitkit.models.train.random_init_like``).
* ``shuffled_feature``: the same tests on the real model with the feature's values permuted
  across inputs (so "f differs" / "f agrees" no longer mean anything).
"""
from __future__ import annotations

from typing import Sequence

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.train import random_init_like
from circuitkit.verify.interchange import InterchangeVerifier, Verdict

CONTROLS = ("random_model", "shuffled_feature")


def null_verifier(verifier: InterchangeVerifier, seed: int = 0) -> InterchangeVerifier:
    """A verifier over a randomly initialised copy of the verifier's model (same inputs, features)."""
    null_pm: ProbedModel = random_init_like(verifier.pm, seed=seed)
    return verifier.with_model(null_pm)


def run_controls(verifier: InterchangeVerifier, null: InterchangeVerifier, site: str,
                 features: Sequence[str]) -> list[Verdict]:
    """Both null controls for one (site, features) test."""
    return [null.test(site, features, condition="random_model"),
            verifier.test(site, features, condition="shuffled_feature", shuffle=True)]


__all__ = ["CONTROLS", "null_verifier", "run_controls"]
