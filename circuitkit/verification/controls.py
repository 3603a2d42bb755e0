"""Null controls that run beside every real verification, each of which *could* fail.

* ``random_model``: the same tests (same inputs, pairs and features) on a randomly initialised
  model of the same architecture, scaled until its predictions vary with the input
  (``varied_random_model``) — a model that predicts one token for every input cannot fail a test.
  A claim that verifies there too is *architectural* (true by construction, e.g. an embedding
  carries its own token), reported apart from learned findings and never counted as one.
* ``shuffled_feature``: the same tests on the real model with each input's feature values
  replaced by those of a fixed pseudo-random other input (same marginals, no association); the
  answer model of the real feature still predicts, so IIA would be high only if the test were
  broken.  Must verify nothing.
* ``proxy``: beside every verified (site, feature), the feature's declared proxies (``Task.proxies``:
  correlated with it without determining the answer the same way, e.g. the string's length for
  the count of one letter) are tested at the same site.  They must be rejected.  A proxy that the
  site is itself verified to carry (a node of its own, e.g. the residual at S3 carrying S3 beside
  F3+S3) is no null there: its control would repeat that real, verified test, so it is skipped
  and listed as skipped.
"""
from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import torch

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.train import as_probed
from circuitkit.verification.interchange import InterchangeVerifier, Verdict

CONTROLS = ("random_model", "shuffled_feature", "proxy")
#: controls whose verified tests are failures (random_model verdicts mark claims architectural instead)
FAILING_CONTROLS = ("shuffled_feature", "proxy")
#: initial weight scales tried for the random model, smallest first
INIT_SCALES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class RandomModelInfo:
    """How the random-init control model was made and how varied its predictions are."""

    init_std: float
    distinct_predictions: int
    top_share: float  # share of inputs given the most common prediction (over every answer)

    def to_dict(self) -> dict:
        return {"init_std": self.init_std, "distinct_predictions": self.distinct_predictions,
                "top_share": round(self.top_share, 4)}


def _prediction_spread(pm: ProbedModel, ids: torch.Tensor, rows_targets) -> tuple[int, float]:
    with torch.no_grad():
        pred = pm.runner.logits(ids.to(pm.device)).argmax(-1).cpu()
    preds = [int(pred[i, t.position]) for i, ts in enumerate(rows_targets) for t in ts]
    if not preds:
        return 0, 1.0
    vals, counts = np.unique(preds, return_counts=True)
    return int(vals.size), float(counts.max() / counts.sum())


def varied_random_model(verifier: InterchangeVerifier, seed: int = 0, max_top_share: float = 0.5,
                        min_distinct: int = 3) -> tuple[ProbedModel, RandomModelInfo]:
    """A randomly initialised copy of the verifier's model whose predictions vary with the input:
    the smallest weight scale in ``INIT_SCALES`` at which no prediction takes more than
    ``max_top_share`` of the answers and at least ``min_distinct`` tokens are predicted (else the
    most varied one tried)."""
    pm = verifier.pm
    n = min(500, len(verifier.inputs))
    ids, targets = verifier.ids[:n], verifier.targets[:n]
    best = None
    for std in INIT_SCALES:
        cfg = pm.hf_model.config.__class__.from_dict({**pm.hf_model.config.to_dict(), "initializer_range": std})
        torch.manual_seed(seed)
        fresh = as_probed(type(pm.hf_model)(cfg).to(pm.device), pm.task)  # same family as the probed model
        distinct, top = _prediction_spread(fresh, ids, targets)
        info = RandomModelInfo(std, distinct, top)
        if best is None or (top, -distinct) < (best[1].top_share, -best[1].distinct_predictions):
            best = (fresh, info)
        if top <= max_top_share and distinct >= min_distinct:
            return fresh, info
    return best


def null_verifier(verifier: InterchangeVerifier, seed: int = 0) -> InterchangeVerifier:
    """A verifier over a varied random-init copy of the verifier's model (same inputs, splits, features);
    ``.random_model_info`` says how it was made."""
    model, info = varied_random_model(verifier, seed)
    null = verifier.with_model(model)
    null.random_model_info = info  # type: ignore[attr-defined]
    return null


def run_controls(verifier: InterchangeVerifier, null: InterchangeVerifier, site: str, features: Sequence[str],
                 split: str = "search") -> list[Verdict]:
    """The random-model and shuffled-feature controls for one (site, features) test."""
    return [null.test(site, features, condition="random_model", split=split),
            verifier.test(site, features, condition="shuffled_feature", shuffle=True, split=split)]


def proxy_features(verifier: InterchangeVerifier, site: str, feature: str) -> list[str]:
    """The task's declared proxies of ``feature`` (``Task.proxies``).  Proxies are declared, not mined: the
    feature most associated with a verified one is often something the site genuinely carries too (an
    operand digit beside its column sum), and rejecting that would be wrong."""
    return [p for p in verifier.task.proxies(feature) if p in verifier.features and p != feature]


def run_proxy_controls(verifier: InterchangeVerifier, site: str, feature: str, split: str = "search",
                       carried: AbstractSet[str] = frozenset()) -> list[Verdict]:
    """The proxy control beside a verified (site, feature): each proxy tested at the site, except those in
    ``carried`` (features the site is itself verified to carry, for which the control is no null)."""
    return [verifier.test(site, [p], condition="proxy", split=split)
            for p in proxy_features(verifier, site, feature) if p not in carried]


__all__ = ["CONTROLS", "FAILING_CONTROLS", "RandomModelInfo", "varied_random_model", "null_verifier", "run_controls",
           "proxy_features", "run_proxy_controls"]
