"""Verify a list of hypotheses: per hypothesis, per site (joint feature sets), with null controls.

Flow per site: test every accepted hypothesis alone (necessity + sufficiency).  Features that are
necessary and sufficient alone are verified.  If some are necessary but none is sufficient alone,
grow a set — the necessary features (largest effect first), then the site's other accepted features
— up to ``max_joint`` until sources agreeing on the whole set leave the output unchanged; the set is
then verified jointly (its first feature must be necessary).  Every test that verifies is
repeated under both null controls, and every single-feature test under both as well.

Then, per position and feature: the components (heads, MLP outputs — not the residual stream, whose
sites contain one another) where the feature is accepted but not verified alone are patched
together as a *site group* (components that carry it redundantly, like backup heads, move nothing
one at a time).  A group that verifies is pruned greedily to a minimal one — a member is
dropped while the group still verifies without it — and each remaining member becomes a node that
names its group.  Group tests run beside both null controls too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from circuitkit.hypotheses.records import Hypothesis
from circuitkit.sites import parse_site
from circuitkit.verify.controls import CONTROLS, null_verifier, run_controls
from circuitkit.verify.interchange import InterchangeVerifier, Verdict, VerifyThresholds, group_name


@dataclass(frozen=True)
class VerifiedNode:
    """A verified (site@position, features) with the answers it is necessary for."""

    site: str
    features: tuple[str, ...]
    targets: tuple[str, ...]  # answers where necessity and sufficiency both hold
    effect: float  # largest necessity effect over those answers
    iia: float | None  # IIA on the best answer when the feature determines it
    joint: bool  # verified as a set (no single feature sufficient alone)
    group: tuple[str, ...] = ()  # verified only patched together with these sites (this one included)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "features": list(self.features), "targets": list(self.targets),
                "effect": self.effect, "iia": self.iia, "joint": self.joint, "group": list(self.group)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VerifiedNode":
        return cls(d["site"], tuple(d["features"]), tuple(d["targets"]), d["effect"], d.get("iia"), d["joint"],
                   tuple(d.get("group", ())))


@dataclass
class VerificationReport:
    task: str
    model: str
    thresholds: VerifyThresholds
    nodes: list[VerifiedNode]
    verdicts: list[Verdict]
    controls: list[Verdict]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def controls_verified(self) -> list[Verdict]:
        return [v for v in self.controls if v.verified]

    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """compact: per verdict only the verdict and per-answer effect / change-when-agree / IIA (rounded)."""
        conv = _compact if compact else (lambda v: v.to_dict())
        return {"task": self.task, "model": self.model, "thresholds": self.thresholds.to_dict(),
                "thresholds_text": self.thresholds.describe(), "settings": self.settings,
                "nodes": [n.to_dict() for n in self.nodes],
                "n_verified_hypotheses": sum(v.verified for v in self.verdicts),
                "controls_summary": {c: {"tested": sum(v.condition == c for v in self.controls),
                                         "verified": sum(v.verified and v.condition == c for v in self.controls)}
                                     for c in CONTROLS},
                "verdicts": [conv(v) for v in self.verdicts],
                "controls": [conv(v) for v in self.controls]}


def _compact(v: Verdict) -> dict[str, Any]:
    def est(e) -> list[float] | None:
        return None if e is None else [round(e.mean, 3), round(e.ci_low, 3), round(e.ci_high, 3)]

    return {"site": v.site, "features": list(v.features), "condition": v.condition, "verified": v.verified,
            "necessary_targets": v.necessary_targets, "verified_targets": v.verified_targets,
            "targets": {r.target: {"effect": est(r.effect), "change_agree": est(r.change_agree), "iia": est(r.iia),
                                   "n": [r.n_differ, r.n_agree]} for r in v.targets}}


def _best(v: Verdict) -> tuple[float, float | None]:
    rs = [r for r in v.targets if r.target in v.verified_targets] or [r for r in v.targets if r.necessary]
    if not rs:
        return 0.0, None
    r = max(rs, key=lambda r: r.effect.mean if r.effect else 0.0)
    return (round(r.effect.mean, 4) if r.effect else 0.0), (round(r.iia.mean, 4) if r.iia else None)


def verify_hypotheses(verifier: InterchangeVerifier, hypotheses: Sequence[Hypothesis], controls: bool = True,
                      max_joint: int = 4, null_seed: int = 0, model_name: str = "",
                      max_group: int = 8) -> VerificationReport:
    """Verify accepted hypotheses (others are ignored) and run the null controls beside them.

    ``max_group``: the largest site group tested for a redundantly carried feature (0 = no groups)."""
    null = null_verifier(verifier, null_seed) if controls else None
    by_site: dict[str, list[str]] = {}
    for h in hypotheses:
        if h.accepted:
            by_site.setdefault(h.site, []).append(h.feature)
    verdicts: list[Verdict] = []
    ctrl: list[Verdict] = []
    nodes: list[VerifiedNode] = []
    for site, feats in by_site.items():
        singles = []
        for f in feats:
            v = verifier.test(site, [f])
            singles.append(v)
            verdicts.append(v)
            if null is not None:
                ctrl += run_controls(verifier, null, site, [f])
        alone = [v for v in singles if v.verified]
        for v in alone:
            eff, iia = _best(v)
            nodes.append(VerifiedNode(site, v.features, tuple(v.verified_targets), eff, iia, False))
        necessary = sorted([v for v in singles if v.necessary_targets and not v.verified],
                           key=lambda v: -_best(v)[0])
        if alone or not necessary:
            continue
        # grow a set: necessary features first (largest effect first), then the site's other accepted
        # features (they may be what the site also carries, breaking sufficiency of the first ones)
        others = sorted([v for v in singles if not v.necessary_targets],
                        key=lambda v: -max((r.effect.mean for r in v.targets if r.effect), default=0.0))
        chosen: list[str] = []
        for v in (necessary + others)[:max_joint]:
            chosen.append(v.features[0])
            if len(chosen) < 2:
                continue
            jv = verifier.test(site, chosen, condition="real")
            jv.note = (jv.note + "; " if jv.note else "") + "joint feature set"
            verdicts.append(jv)
            if null is not None:
                ctrl += run_controls(verifier, null, site, chosen)
            if jv.verified:
                eff, iia = _best(jv)
                nodes.append(VerifiedNode(site, tuple(chosen), tuple(jv.verified_targets), eff, iia, True))
                break
    verified_alone = {(n.site, f) for n in nodes for f in n.features}
    for (_, feature), members in _group_candidates(hypotheses, verified_alone, max_group).items():
        gv, gctrl, kept = _verify_group(verifier, null, members, feature)
        verdicts += gv
        ctrl += gctrl
        if kept is not None:
            eff, iia = _best(kept[1])
            nodes += [VerifiedNode(site, (feature,), tuple(kept[1].verified_targets), eff, iia, False, tuple(kept[0]))
                      for site in kept[0]]
    settings = {"n_inputs": len(verifier.inputs), "n_pairs": verifier.n_pairs, "seed": verifier.seed,
                "controls": list(CONTROLS) if controls else [], "max_joint": max_joint, "max_group": max_group}
    return VerificationReport(verifier.task.name, model_name, verifier.th, nodes, verdicts, ctrl, settings)


#: site kinds that write into the residual stream side by side, so may carry a feature redundantly
GROUPABLE_KINDS = ("head", "z", "attn_out", "mlp_out", "mlp_post")


def _group_candidates(hypotheses: Sequence[Hypothesis], verified_alone: set[tuple[str, str]],
                      max_group: int) -> dict[tuple[str, str], list[str]]:
    """{(position, feature): sites} where the feature is accepted at 2..max_group components of one
    position and verified alone at none of them (strongest agreement first)."""
    by: dict[tuple[str, str], list[Hypothesis]] = {}
    for h in hypotheses:
        site = parse_site(h.site)
        if h.accepted and site.kind in GROUPABLE_KINDS:
            by.setdefault((str(site.position), h.feature), []).append(h)
    out = {}
    for key, hs in by.items():
        if any((h.site, key[1]) in verified_alone for h in hs) or not 2 <= len(hs) <= max_group:
            continue
        out[key] = [h.site for h in sorted(hs, key=lambda h: -h.kappa)]
    return out


def _verify_group(verifier: InterchangeVerifier, null: InterchangeVerifier | None, members: list[str],
                  feature: str) -> tuple[list[Verdict], list[Verdict], tuple[list[str], Verdict] | None]:
    """Test the group; if it verifies, drop members (weakest first) while it still does.
    Returns (verdicts, control verdicts, (kept members, their verdict) or None)."""
    verdicts: list[Verdict] = []
    ctrl: list[Verdict] = []

    def run(sites: list[str]) -> Verdict:
        v = verifier.test(group_name(sites), [feature])
        v.note = (v.note + "; " if v.note else "") + "site group"
        verdicts.append(v)
        if null is not None:
            ctrl.extend(run_controls(verifier, null, group_name(sites), [feature]))
        return v

    v = run(members)
    if not v.verified:
        return verdicts, ctrl, None
    kept, best = list(members), v
    for m in reversed(members):
        if len(kept) <= 2:
            break  # a one-site "group" was already tested alone
        trial = [x for x in kept if x != m]
        tv = run(trial)
        if tv.verified:
            kept, best = trial, tv
    return verdicts, ctrl, (kept, best)


def format_verification(rep: VerificationReport) -> str:
    lines = [f"{rep.task}: {len(rep.nodes)} verified nodes; {rep.thresholds.describe()}"]
    for n in rep.nodes:
        iia = f", IIA {n.iia:.2f}" if n.iia is not None else ""
        lines.append(f"  VERIFIED {n.site:<10} carries {' + '.join(n.features):<24} -> {', '.join(n.targets)} "
                     f"(effect {n.effect:.2f}{iia}{', jointly' if n.joint else ''}"
                     f"{', only with ' + ', '.join(x for x in n.group if x != n.site) if n.group else ''})")
    for v in rep.verdicts:
        if v.verified:
            continue
        nec = f"necessary for {', '.join(v.necessary_targets)} but not sufficient" if v.necessary_targets else "not necessary"
        lines.append(f"  rejected {v.site:<10} {' + '.join(v.features):<24} {nec}")
    d = rep.to_dict()["controls_summary"]
    lines.append("null controls: " + "; ".join(f"{c}: {s['verified']} of {s['tested']} verified" for c, s in d.items()))
    return "\n".join(lines)


__all__ = ["VerifiedNode", "VerificationReport", "verify_hypotheses", "format_verification", "parse_site"]
