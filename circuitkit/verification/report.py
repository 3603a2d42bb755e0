"""Verify a list of hypotheses: per hypothesis, per site (joint feature sets), with null controls.

Flow per site: test every accepted hypothesis alone (fair pairs, IIA, moves, stable: see
``circuitkit.verification.interchange``).  Features verified alone become nodes.  If none is, grow a
set — the features that move the output (largest effect first), then the site's other accepted
features — up to ``max_joint`` until the set verifies jointly (sources agreeing on the whole set
leave the output unchanged and IIA holds for the set); a set found this way is re-tested on the
held-out ``confirm`` inputs and kept only if it verifies there too.

Then, per position and feature: the components (heads, MLP outputs — not the residual stream, whose
sites contain one another) where the feature is accepted but not verified alone are patched
together as a *site group* (components that carry it redundantly, like backup heads, move nothing
one at a time).  The group grows from the members strongest alone (by IIA) until it verifies, is then
pruned greedily to a minimal one — a member is dropped while the group still verifies without it — and
confirmed on the held-out inputs (the minimal group, else the group before pruning, at a Bonferroni level
over the two); each remaining member becomes a node that names its group.

*Joining a carrier*: a component left with no label at all, where a feature is accepted (or claimed) that a
verified component or group carries at the same position, may carry a weak share of it that fails alone (IOI's
a0.0@IO beside a0.1@IO, both carrying S).  It is patched together with that carrier (the strongest one there)
and must (a) verify as a group at the carrier's level, and (b) *add* to it: on the group's own f-differing
pairs, the paired difference of the shift towards the predicted answer with and without the component has a
CI above 0 (``InterchangeVerifier.added_shift``).  A component that carries nothing about f adds nothing in
expectation, so (b) is the test that can fail; both hold on the search half and again on the held-out half
before the component becomes a node naming the joined group.  Every join tried is listed (``joins_tried``).

Where two features verify alone at one site and one is a strictly coarser function of the other on the
inputs (tracr's ``tokens == 'x'`` of ``tokens``), an interchange on the answer cannot tell them apart when the
answer needs only the coarse one; the site's preimages can (InversionView: the activation is the same for
inputs that differ in the finer feature only).  The finer label is dropped when the coarser one has the higher
preimage agreement (kappa) there, and the drop is recorded (``finer_labels_dropped``).

Null controls run beside every test (``circuitkit.verification.controls``); a node whose test also
verifies on the random-init model is marked *architectural*; every verified node gets a proxy control.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from circuitkit import shards
from circuitkit.hypotheses.records import Hypothesis
from circuitkit.results import JsonResult
from circuitkit.sites import group_name, parse_site
from circuitkit.tasks.registry import task_record
from circuitkit.verification.causal import DATA_DRIVEN
from circuitkit.verification.controls import (
    CONTROLS,
    FAILING_CONTROLS,
    null_verifier,
    proxy_features,
    run_controls,
    run_proxy_controls,
)
from circuitkit.verification.interchange import InterchangeVerifier, Verdict, VerifyThresholds


@dataclass(frozen=True)
class VerifiedNode:
    """A verified (site@position, features) with the answers it is verified for."""

    site: str
    features: tuple[str, ...]
    targets: tuple[str, ...]  # answers where IIA, moves and stable all hold
    effect: float  # necessity effect (change differ − change agree) on the best answer
    iia: float | None  # IIA on the best answer
    joint: bool  # verified as a set (no single feature verified alone)
    group: tuple[str, ...] = ()  # verified only patched together with these sites (this one included)
    architectural: bool = False  # the same test also verifies on the random-init model
    confirmed: bool | None = None  # joint/group search result re-verified on held-out inputs (None: not searched)
    hold: tuple[str, ...] = ()  # what the fair sources held fixed
    iia_ci: tuple[float, float] | None = None
    #: how the predictions behind its IIA were made (``verification/causal.py``: the task's causal model, else
    #: the data-driven g(f, D)), per verified answer
    prediction: tuple[str, ...] = ()
    #: "answer": IIA on the argmax; "logit": a component that never flips the answer, verified by the graded
    #: (logit-level) IIA that ``iia`` then holds (``verification/interchange.py``)
    level: str = "answer"

    @property
    def learned(self) -> bool:
        return not self.architectural

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "features": list(self.features), "targets": list(self.targets),
                "effect": self.effect, "iia": self.iia, "iia_ci": None if self.iia_ci is None else list(self.iia_ci),
                "joint": self.joint, "group": list(self.group), "architectural": self.architectural,
                "confirmed": self.confirmed, "hold": list(self.hold), "prediction": list(self.prediction),
                "level": self.level}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifiedNode:
        ci = d.get("iia_ci")
        return cls(d["site"], tuple(d["features"]), tuple(d["targets"]), d["effect"], d.get("iia"), d["joint"],
                   tuple(d.get("group", ())), bool(d.get("architectural", False)), d.get("confirmed"),
                   tuple(d.get("hold", ())), None if ci is None else (float(ci[0]), float(ci[1])),
                   tuple(d.get("prediction", ())), d.get("level", "answer"))


@dataclass
class VerificationReport(JsonResult):
    task: str
    model: str
    thresholds: VerifyThresholds
    nodes: list[VerifiedNode]
    verdicts: list[Verdict]
    controls: list[Verdict]
    settings: dict[str, Any] = field(default_factory=dict)
    task_ref: dict[str, Any] = field(default_factory=dict)  # registry.task_record: reloads a plug-in task

    @property
    def controls_verified(self) -> list[Verdict]:
        """Control tests that verified although they must not (shuffled feature, proxy)."""
        return [v for v in self.controls if v.verified and v.condition in FAILING_CONTROLS]

    @property
    def learned_nodes(self) -> list[VerifiedNode]:
        return [n for n in self.nodes if n.learned]

    @property
    def architectural_nodes(self) -> list[VerifiedNode]:
        return [n for n in self.nodes if n.architectural]

    def controls_summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for c in CONTROLS:
            vs = [v for v in self.controls if v.condition == c]
            out[c] = {"tested": len(vs), "verified": sum(v.verified for v in vs),
                      "must_verify_nothing": c in FAILING_CONTROLS}
        return out

    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """compact: per verdict only the verdict and per-answer effect / change-when-agree / IIA (rounded)."""
        conv = _compact if compact else (lambda v: v.to_dict())
        return {"task": self.task, "task_ref": self.task_ref, "model": self.model,
                "thresholds": self.thresholds.to_dict(),
                "thresholds_text": self.thresholds.describe(), "settings": self.settings,
                "nodes": [n.to_dict() for n in self.nodes],
                "n_learned_nodes": len(self.learned_nodes), "n_architectural_nodes": len(self.architectural_nodes),
                "n_verified_hypotheses": sum(v.verified for v in self.verdicts),
                "controls_summary": self.controls_summary(),
                "verdicts": [conv(v) for v in self.verdicts],
                "controls": [conv(v) for v in self.controls]}


def _compact(v: Verdict) -> dict[str, Any]:
    def est(e) -> list[float] | None:
        return None if e is None else [round(e.mean, 3), round(e.ci_low, 3), round(e.ci_high, 3)]

    return {"site": v.site, "features": list(v.features), "condition": v.condition, "split": v.split,
            "verified": v.verified, "level": v.level, "necessary_targets": v.necessary_targets,
            "verified_targets": v.verified_targets, "note": v.note, "hold": list(v.hold),
            "targets": {r.target: {"effect": est(r.effect), "change_agree": est(r.change_agree), "iia": est(r.iia),
                                   "graded_iia": est(r.graded_iia), "shift_differ": est(r.shift_differ),
                                   "shift_agree": est(r.shift_agree), "relevant": r.relevant, "level": r.level,
                                   "n": [r.n_differ, r.n_agree]} for r in v.targets}}


def _best(v: Verdict) -> tuple[float, float | None, tuple[float, float] | None]:
    r = v.best()
    if r is None:
        return 0.0, None, None
    eff = round(r.effect.mean, 4) if r.effect else 0.0
    iia = r.verified_iia
    if iia is None:
        return eff, None, None
    return eff, round(iia.mean, 4), (round(iia.ci_low, 4), round(iia.ci_high, 4))


def _strength(v: Verdict) -> tuple[float, float]:
    """(IIA, graded IIA) of a verdict's best answer (−1 where absent): how strongly a site carries a feature alone."""
    r = v.best()
    return ((r.iia.mean if r and r.iia else -1.0), (r.graded_iia.mean if r and r.graded_iia else -1.0))


def _node(v: Verdict, site: str, twin: Verdict | None, joint: bool = False, group: Sequence[str] = (),
          confirmed: bool | None = None) -> VerifiedNode:
    eff, iia, ci = _best(v)
    how = tuple(dict.fromkeys(r.answer_model.get("method", DATA_DRIVEN) for r in v.targets
                              if r.target in v.verified_targets and r.answer_model))
    return VerifiedNode(site, v.features, tuple(v.verified_targets), eff, iia, joint, tuple(group),
                        bool(twin is not None and twin.verified), confirmed, v.hold, ci, how, v.level or "answer")


def claim_hypothesis(site: str, feature: str) -> Hypothesis:
    """A pre-registered claim ("site carries feature", e.g. the paper's) to verify directly: it has no
    preimage statistics (``n_queries`` = 0) and is marked accepted so the verifier tests it."""
    return Hypothesis(site, feature, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"),
                      float("nan"), 0, 0, 0, True)


def _features_by_site(hypotheses: Sequence[Hypothesis], claims: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """{site: features to test there}: the accepted hypotheses' features, then the claims not among them."""
    by_site: dict[str, list[str]] = {}
    for h in hypotheses:
        if h.accepted:
            by_site.setdefault(h.site, []).append(h.feature)
    for site, feature in claims:
        if feature not in by_site.setdefault(site, []):
            by_site[site].append(feature)
    return by_site


_TestKey = tuple[str, tuple[str, ...], str, int]  # (site, features, split, family)


def _test_with_controls(verifier: InterchangeVerifier, null: InterchangeVerifier | None, key: _TestKey
                        ) -> tuple[Verdict, list[Verdict]]:
    """One test and its null controls (none for a test that was not patched: it predicts no answer)."""
    site, feats, split, family = key
    v = verifier.test(site, list(feats), split=split, skip_unpredictive=True, family=family)
    cs = run_controls(verifier, null, site, list(feats), split) if null is not None and v.targets else []
    return v, cs


class _ControlledTester:
    """Runs tests with their null controls beside them, recording every verdict in ``verdicts`` and every control
    in ``ctrl``, in the order the (adaptive) verification asks for them.

    Under torch.distributed, ``ahead(keys)`` runs tests that are about to be asked for, each on one rank, and
    gathers them on all (``circuitkit.shards``): every first-pass single at once, and in a greedy search the
    next world-size candidates (a rank may run one the search then does not need).  Each test is seeded by
    its own key, so a verdict does not depend on which rank ran it; every rank replays the same sequence, so
    the report equals one process's.  With one process ``ahead`` does nothing."""

    def __init__(self, verifier: InterchangeVerifier, null: InterchangeVerifier | None, verdicts: list[Verdict],
                 ctrl: list[Verdict]) -> None:
        self.verifier, self.null, self.verdicts, self.ctrl = verifier, null, verdicts, ctrl
        self._done: dict[_TestKey, tuple[Verdict, list[Verdict]]] = {}

    def ahead(self, keys: Sequence[_TestKey], all_at_once: bool = False) -> None:
        """Run ``keys`` (all of them, else the next world-size ones when the first is not done yet) over the ranks."""
        size = shards.world()[1]
        if size == 1 or not keys or keys[0] in self._done:
            return
        todo = list(dict.fromkeys(keys if all_at_once else keys[:size]))
        self._done.update(zip(todo, shards.map_units(lambda k: _test_with_controls(self.verifier, self.null, k),
                                                     todo), strict=True))

    def __call__(self, site: str, feats: Sequence[str], split: str = "search", family: int = 1
                 ) -> tuple[Verdict, Verdict | None]:
        key = (site, tuple(feats), split, family)
        v, cs = self._done.pop(key, None) or _test_with_controls(self.verifier, self.null, key)
        self.verdicts.append(v)
        self.ctrl.extend(cs)
        return v, (cs[0] if cs else None)


def _verify_sites(with_controls: _ControlledTester, items: list[tuple[str, list[str]]], max_joint: int,
                  progress: bool) -> list[VerifiedNode]:
    """Per site, the features verified alone, else a joint feature set grown there (see the module docstring)."""
    nodes: list[VerifiedNode] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="verify", unit="site")
    with_controls.ahead([(site, (f,), "search", 1) for site, feats in items for f in feats], all_at_once=True)
    for site, feats in items:
        singles = [with_controls(site, [f]) for f in feats]
        alone = [(v, t) for v, t in singles if v.verified]
        nodes += [_node(v, site, t) for v, t in alone]
        if bar is not None:
            bar.update(1)
        if alone:
            continue
        joint = _grow_joint_set(with_controls, site, singles, max_joint)
        if joint is not None:
            nodes.append(joint)
    if bar is not None:
        bar.close()
    return nodes


def _coarsest_labels(verifier: InterchangeVerifier, nodes: list[VerifiedNode], hypotheses: Sequence[Hypothesis]
                     ) -> tuple[list[VerifiedNode], list[list[Any]]]:
    """The nodes without a single-feature label f where a coarser g (a function of f, not the reverse, on the
    verifier's inputs at the site's position) also verified alone and the site's preimages agree with g more than
    with f (module docstring); and the drops as [site, f, g, kappa f, kappa g]."""
    from circuitkit.hypotheses.scoring import is_function_of

    kappa = {(h.site, h.feature): h.kappa for h in hypotheses if h.kappa == h.kappa}
    singles: dict[str, list[str]] = {}
    for n in nodes:
        if len(n.features) == 1 and not n.group and not n.joint:
            singles.setdefault(n.site, []).append(n.features[0])
    drop: dict[tuple[str, str], list[Any]] = {}
    for site, feats in singles.items():
        if len(feats) < 2 or parse_site(site).position is None:
            continue
        codes = verifier.coder.codes(feats, verifier.inputs, parse_site(site).position)  # [len(feats), n_inputs]
        for i, f in enumerate(feats):
            for j, g in enumerate(feats):
                kf, kg = kappa.get((site, f)), kappa.get((site, g))
                if i == j or kf is None or kg is None or kg <= kf or (site, f) in drop:
                    continue
                if is_function_of(codes[j], codes[i]) and not is_function_of(codes[i], codes[j]):
                    drop[(site, f)] = [site, f, g, round(kf, 4), round(kg, 4)]
    kept = [n for n in nodes if not (len(n.features) == 1 and (n.site, n.features[0]) in drop)]
    return kept, list(drop.values())


def _grow_joint_set(with_controls: _ControlledTester, site: str, singles: list[tuple[Verdict, Verdict | None]],
                    max_joint: int) -> VerifiedNode | None:
    """The joint feature set of a site where no feature verified alone, confirmed on held-out inputs, or None."""
    moving = sorted([v for v, _ in singles if v.necessary_targets and not v.verified], key=lambda v: -_best(v)[0])
    if not moving:
        return None
    # grow a set: features that move the output first (largest effect first), then the site's other
    # accepted features (they may be what the site also carries, breaking stability of the first ones)
    others = sorted([v for v, _ in singles if not v.necessary_targets],
                    key=lambda v: -max((r.effect.mean for r in v.targets if r.effect), default=0.0))
    order = [v.features[0] for v in (moving + others)[:max_joint]]
    chosen: list[str] = []
    for f in order:
        chosen.append(f)
        if len(chosen) < 2:
            continue
        with_controls.ahead([(site, tuple(order[:k]), "search", 1) for k in range(len(chosen), len(order) + 1)])
        jv, _ = with_controls(site, chosen)
        jv.note = (jv.note + "; " if jv.note else "") + "joint feature set (search)"
        if jv.verified:
            cv, twin = with_controls(site, chosen, split="confirm")
            cv.note = (cv.note + "; " if cv.note else "") + "joint feature set (held-out confirmation)"
            if cv.verified:
                return _node(cv, site, twin, joint=True, confirmed=True)
            return None
    return None


def _with_site_groups(with_controls: _ControlledTester, nodes: list[VerifiedNode], verdicts: Sequence[Verdict],
                      hypotheses: Sequence[Hypothesis], max_group: int) -> list[VerifiedNode]:
    """The nodes with each verified site group's members added, replacing their logit-level claims on its feature."""
    # a component verified alone at the logit level may still carry the feature at the answer level with others
    verified_alone = {(n.site, f) for n in nodes if n.level == "answer" for f in n.features}
    alone_iia = {(v.site, v.features[0]): _strength(v) for v in verdicts if len(v.features) == 1 and v.condition == "real"}
    for (_, feature), members in _group_candidates(hypotheses, verified_alone, max_group).items():
        members = sorted(members, key=lambda m: tuple(-x for x in alone_iia.get((m, feature), (-1.0, -1.0))))  # stable: kappa order on ties
        kept = _verify_group(with_controls, members, feature)
        if kept is not None:
            sites, cv, twin = kept
            # the group's answer-level claim replaces its members' logit-level claims for this feature
            nodes = [n for n in nodes if not (n.site in sites and n.features == (feature,) and not n.group)]
            nodes += [_node(cv, s, twin, group=sites, confirmed=True) for s in sites]
    return nodes


def _joined_nodes(with_controls: _ControlledTester, nodes: Sequence[VerifiedNode], hypotheses: Sequence[Hypothesis]
                  ) -> tuple[list[VerifiedNode], list[list[Any]]]:
    """Nodes for the components left with no label that carry a feature as part of a verified carrier at their
    position (module docstring: joining a carrier), and the record of every join tried as [site, feature, carrier,
    joined, added shift on the search half [mean, CI low], on the held-out half (None: not reached)]."""
    labelled = {n.site for n in nodes}
    carrier: dict[tuple[str, str], VerifiedNode] = {}
    for n in nodes:
        members = n.group or (n.site,)
        if len(n.features) != 1 or n.joint or any(parse_site(m).kind not in GROUPABLE_KINDS for m in members):
            continue
        key = (str(parse_site(n.site).position), n.features[0])
        if key not in carrier or (n.iia or 0.0) > (carrier[key].iia or 0.0):
            carrier[key] = n
    out: list[VerifiedNode] = []
    tried: list[list[Any]] = []
    seen: set[tuple[str, str]] = set()
    for h in hypotheses:
        site = parse_site(h.site)
        key = (str(site.position), h.feature)
        if (not h.accepted or site.kind not in GROUPABLE_KINDS or h.site in labelled or key not in carrier
                or (h.site, h.feature) in seen):
            continue
        seen.add((h.site, h.feature))
        base = list(carrier[key].group or (carrier[key].site,))
        joined = group_name([*base, h.site])
        record: list[Any] = [h.site, h.feature, group_name(base), joined, None, None]
        tried.append(record)
        for k, split in enumerate(("search", "confirm")):
            v, twin = with_controls(joined, [h.feature], split)
            best = v.best()
            if not v.verified or best is None or v.level != carrier[key].level:
                break
            adds = with_controls.verifier.added_shift(joined, h.site, [h.feature], split).get(best.target)
            record[4 + k] = None if adds is None else [round(adds.mean, 4), round(adds.ci_low, 4)]
            v.note = (v.note + "; " if v.note else "") + f"{h.site} joining {group_name(base)} ({split})"
            if adds is None or adds.ci_low <= 0:
                break
            if split == "confirm":
                out.append(_node(v, h.site, twin, group=[*base, h.site], confirmed=True))
    return out, tried


def _joint_group_nodes(verifier: InterchangeVerifier, with_controls: _ControlledTester, nodes: Sequence[VerifiedNode],
                       hypotheses: Sequence[Hypothesis], max_group: int, max_joint: int) -> list[VerifiedNode]:
    """The member nodes of the site groups that verify a joint feature set where nothing is explained yet."""
    out: list[VerifiedNode] = []
    for _position, (members, feats) in _joint_group_candidates(hypotheses, explained_at(nodes), max_group).items():
        kept = _verify_joint_group(verifier, with_controls, members, feats, max_joint)
        if kept is not None:
            sites, cv, twin = kept
            out += [_node(cv, s, twin, joint=True, group=sites, confirmed=True) for s in sites]
    return out


def _proxy_controls(verifier: InterchangeVerifier, nodes: Sequence[VerifiedNode]
                    ) -> tuple[list[Verdict], list[list[str]]]:
    """(proxy control verdicts of every single-feature node, [site, feature, proxy] skipped as the site carries it)."""
    carried: dict[str, set[str]] = {}
    for n in nodes:
        if len(n.features) == 1 and not n.group:
            carried.setdefault(n.site, set()).add(n.features[0])
    ctrl: list[Verdict] = []
    proxy_skipped: list[list[str]] = []
    for n in list(nodes):
        if len(n.features) == 1 and not n.group:
            ctrl.extend(run_proxy_controls(verifier, n.site, n.features[0], carried=carried[n.site]))
            proxy_skipped += [[n.site, n.features[0], p] for p in proxy_features(verifier, n.site, n.features[0])
                              if p in carried[n.site]]
    return ctrl, proxy_skipped


def verify_hypotheses(verifier: InterchangeVerifier, hypotheses: Sequence[Hypothesis], controls: bool = True,
                      max_joint: int = 4, null_seed: int = 0, model_name: str = "",
                      max_group: int = 12, progress: bool = False,
                      claims: Sequence[tuple[str, str]] = (), known: Sequence[VerifiedNode] = ()
                      ) -> VerificationReport:
    """Verify accepted hypotheses (others are ignored) and pre-registered ``claims`` (site, feature), and run
    the null controls beside them.

    ``max_group``: the largest site group tested for a redundantly carried feature (0 = no groups).
    ``known``: nodes verified before this call (an earlier round of ``circuit/close_loop.py``): carriers that a
    component may join, and sites that already have a label; they are not repeated in the report."""
    null = null_verifier(verifier, null_seed) if controls else None
    by_site = _features_by_site(hypotheses, claims)
    verdicts: list[Verdict] = []
    ctrl: list[Verdict] = []
    with_controls = _ControlledTester(verifier, null, verdicts, ctrl)
    nodes = _verify_sites(with_controls, list(by_site.items()), max_joint, progress)
    nodes, dropped = _coarsest_labels(verifier, nodes, hypotheses)
    with_claims = list(hypotheses) + [claim_hypothesis(s, f) for s, f in claims]
    nodes = _with_site_groups(with_controls, nodes, verdicts, with_claims, max_group)
    nodes += _joint_group_nodes(verifier, with_controls, nodes, with_claims, max_group, max_joint)
    joined, joins_tried = _joined_nodes(with_controls, [*known, *nodes], with_claims) if max_group else ([], [])
    nodes += joined
    proxy_ctrl, proxy_skipped = _proxy_controls(verifier, nodes)
    ctrl.extend(proxy_ctrl)
    settings = {"n_inputs": len(verifier.inputs), "n_pairs": verifier.n_pairs, "n_candidates": verifier.n_candidates,
                "seed": verifier.seed, "controls": list(CONTROLS) if controls else [], "max_joint": max_joint,
                "max_group": max_group, "claims": [list(c) for c in claims],
                "proxy_controls_skipped": proxy_skipped,
                # [site, feature, carrier, joined group, added shift [mean, CI low] on search, on confirm]
                "joins_tried": joins_tried,
                "finer_labels_dropped": dropped,  # [site, finer feature, coarser feature, kappa finer, kappa coarser]  # [site, feature, proxy]: the site carries the proxy too
                "random_model": null.random_model_info.to_dict() if null is not None else None}
    return VerificationReport(verifier.task.name, model_name, verifier.th, nodes, verdicts, ctrl, settings,
                              task_record(verifier.task))


#: site kinds that write into the residual stream side by side, so may carry a feature redundantly
GROUPABLE_KINDS = ("head", "z", "attn_out", "mlp_out", "mlp_post")


def explained_at(nodes: Sequence[VerifiedNode]) -> set[tuple[str, str]]:
    """(position, feature) that a groupable component already carries on the answer.  Residual nodes do not
    count (a residual node always carries what it reads), nor do logit-level ones: they leave the answer to be
    explained, so a joint group there is still worth testing."""
    return {(str(parse_site(n.site).position), f) for n in nodes for f in n.features
            if parse_site(n.site).kind in GROUPABLE_KINDS and n.level == "answer"}


def _group_candidates(hypotheses: Sequence[Hypothesis], verified_alone: set[tuple[str, str]],
                      max_group: int) -> dict[tuple[str, str], list[str]]:
    """{(position, feature): sites}: the 2..max_group components of one position where the feature is accepted
    but not verified alone (strongest agreement first).  A component that verifies alone is left out of the
    group (with it, any group would verify), not a reason to skip the others: an MLP carrying the name that
    the heads before it moved says nothing about whether those heads carry it together."""
    by: dict[tuple[str, str], list[Hypothesis]] = {}
    for h in hypotheses:
        site = parse_site(h.site)
        if h.accepted and site.kind in GROUPABLE_KINDS and (h.site, h.feature) not in verified_alone:
            by.setdefault((str(site.position), h.feature), []).append(h)
    out = {}
    for key, hs in by.items():
        hs = list({h.site: h for h in reversed(hs)}.values())  # a claim and a hypothesis at one site count once
        if not 2 <= len(hs) <= max_group:
            continue
        out[key] = [h.site for h in sorted(hs, key=lambda h: -(h.kappa if h.kappa == h.kappa else 0.0))]
    return out


def _verify_group(with_controls: _ControlledTester, members: list[str], feature: str
                  ) -> tuple[list[str], Verdict, Verdict | None] | None:
    """Grow a group from the members in order (strongest alone first): test the first two, three, ... until
    one verifies; drop members (latest first) while it still does with IIA within ``PRUNE_TOLERANCE`` of the
    grown group's; confirm the minimal group on the
    held-out inputs.  Growing rather than testing everything at once matters: a group that holds every
    component at the position also carries what the feature does not, and fails the stability test.
    Returns (kept members, confirmation verdict, its random-model twin) or None."""

    def run(sites: list[str], split: str = "search", family: int = 1) -> tuple[Verdict, Verdict | None]:
        v, twin = with_controls(group_name(sites), [feature], split, family)
        v.note = (v.note + "; " if v.note else "") + f"site group ({split})"
        return v, twin

    grown, grown_v = None, None
    for k in range(2, len(members) + 1):
        with_controls.ahead([(group_name(members[:j]), (feature,), "search", 1) for j in range(k, len(members) + 1)])
        v, _ = run(members[:k])
        if v.verified:
            grown, grown_v = list(members[:k]), v
            break
    if grown is None or grown_v is None:
        return None
    kept = list(grown)
    for m in reversed(kept[:-1]):  # the member that completed the group stays
        if len(kept) <= 2:
            break  # a one-site "group" was already tested alone
        trial = [x for x in kept if x != m]
        tv, _ = run(trial)
        if _keeps(tv, grown_v):
            kept = trial
    return _confirm_first(run, [kept, grown])


#: pruning a group may cost at most this much IIA: the minimal group must carry the feature as well as the
#: group it was pruned from, not merely clear the verdict rule (a group pruned to the edge of the rule holds on
#: one input stratum and misses on another)
PRUNE_TOLERANCE = 0.05


def _iia_of(v: Verdict) -> float:
    """The IIA (graded at the logit level) of a verdict's best answer, −1 where there is none."""
    r = v.best()
    return r.verified_iia.mean if r is not None and r.verified_iia is not None else -1.0


def _keeps(trial: Verdict, full: Verdict) -> bool:
    """A pruned group replaces the fuller one when it verifies at the same level with IIA within the tolerance."""
    return trial.verified and trial.level == full.level and _iia_of(trial) >= _iia_of(full) - PRUNE_TOLERANCE


def _confirm_first(run, candidates: list[list[str]]) -> tuple[list[str], Verdict, Verdict | None] | None:
    """Confirm on the held-out inputs the pruned group, else the group as it first verified before pruning.
    Pruning stops where a group barely verifies on the search half, so the minimal group may miss on the
    held-out half where a larger one holds; both are chosen before the held-out half is seen, and each
    confirmation is judged at a Bonferroni-adjusted level over the two."""
    distinct = [c for i, c in enumerate(candidates) if c not in candidates[:i]]
    for sites in distinct:
        cv, twin = run(sites, "confirm", len(distinct))
        if cv.verified:
            return sites, cv, twin
    return None


def _joint_group_candidates(hypotheses: Sequence[Hypothesis], explained: set[tuple[str, str]], max_group: int
                            ) -> dict[str, tuple[list[str], list[str]]]:
    """{position: (members, features)} for positions where two or more features are each accepted at two or
    more groupable components and none of them is verified there yet, alone or as a group: the components
    may carry the features only together (e.g. the heads at A1 bringing F1+S1, F2+S2 and the carry)."""
    by: dict[str, dict[str, list[Hypothesis]]] = {}
    for h in hypotheses:
        site = parse_site(h.site)
        if h.accepted and site.kind in GROUPABLE_KINDS:
            by.setdefault(str(site.position), {}).setdefault(h.feature, []).append(h)
    out = {}
    for position, per_feature in by.items():
        if any((position, f) in explained for f in per_feature):
            continue
        feats = [f for f, hs in per_feature.items() if len({h.site for h in hs}) >= 2]
        if len(feats) < 2:
            continue
        kappa: dict[str, float] = {}
        for f in feats:
            for h in per_feature[f]:
                k = h.kappa if h.kappa == h.kappa else 0.0
                kappa[h.site] = max(kappa.get(h.site, -1.0), k)
        members = sorted(kappa, key=lambda m: -kappa[m])[:max_group]
        out[position] = (members, feats)
    return out


def _verify_joint_group(verifier: InterchangeVerifier, with_controls: _ControlledTester, members: list[str],
                        features: list[str], max_joint: int) -> tuple[list[str], Verdict, Verdict | None] | None:
    """Forward selection of a joint feature set on the whole group (search split): add the feature that
    raises IIA x coverage most until the set verifies (at most ``max_joint``); drop members (weakest first)
    while it still does with IIA within ``PRUNE_TOLERANCE`` of the whole group's; confirm on the held-out inputs, controls beside.  Selection only sees the search split."""

    def score(v: Verdict) -> tuple[float, float]:
        """Share of all f-differing pairs whose patched answer the features predict (IIA x coverage), on
        the answers the patch changes: an answer the group cannot change, or IIA over a few predictable
        pairs, must not steer the selection."""
        rel = [r for r in v.targets if r.relevant and r.iia is not None and r.change_differ is not None
               and r.change_differ.mean >= verifier.th.min_effect]
        if not rel:
            return (-1.0, 0.0)
        r = max(rel, key=lambda r: r.iia.mean * (r.iia_coverage or 0.0))
        return (r.iia.mean * (r.iia_coverage or 0.0), r.effect.mean if r.effect else 0.0)

    label = group_name(members)
    chosen: list[str] = []
    remaining = list(features)
    found = None
    while remaining and len(chosen) < max_joint:
        tested = shards.map_units(lambda f: verifier.test(label, chosen + [f], skip_unpredictive=True), remaining)
        trials = [(score(v), f, v) for f, v in zip(remaining, tested, strict=True)]
        best, f, v = max(trials, key=lambda t: t[0])
        if best[0] < 0:
            return None  # no addition makes the set predictive
        chosen.append(f)
        remaining.remove(f)
        if v.verified:
            found = v
            break
    if found is None:
        return None
    kept = list(members)
    for m in reversed(members):
        if len(kept) <= 2:
            break
        trial = [x for x in kept if x != m]
        if _keeps(verifier.test(group_name(trial), chosen), found):
            kept = trial

    def run(sites: list[str], split: str = "search", family: int = 1) -> tuple[Verdict, Verdict | None]:
        v, twin = with_controls(group_name(sites), chosen, split, family)
        what = "search" if split == "search" else "held-out confirmation"
        v.note = (v.note + "; " if v.note else "") + f"joint feature set of a site group ({what})"
        return v, twin

    if not run(kept)[0].verified:
        return None
    return _confirm_first(run, [kept, list(members)])


def _why_rejected(v: Verdict) -> str:
    if v.note and not v.targets:
        return v.note
    rel = [r for r in v.targets if r.relevant]
    if not rel:
        return "predicts no answer (IIA undefined)" + (f"; moves {', '.join(v.necessary_targets)}"
                                                      if v.necessary_targets else "")
    r = max(rel, key=lambda r: r.iia.mean if r.iia else -1)
    parts = []
    if not r.iia_ok:
        parts.append(f"IIA {r.iia.mean:.2f} (CI low {r.iia.ci_low:.2f})" if r.iia else "no IIA")
    if not r.stable and r.change_agree is not None:
        parts.append(f"changes {r.change_agree.mean:.0%} when f agrees")
    if not r.moves:
        parts.append("does not move the output")
        if r.graded_iia is not None:
            parts.append(f"logit level: graded IIA {r.graded_iia.mean:.2f} (CI low {r.graded_iia.ci_low:.2f})"
                         + (f", agreeing sources shift the margin {r.shift_agree.mean:.3g} vs {r.shift_differ.mean:.3g}"
                            if r.shift_agree is not None and r.shift_differ is not None else ""))
    return f"{r.target}: " + ", ".join(parts)


def format_verification(rep: VerificationReport) -> str:
    lines = [f"{rep.task}: {len(rep.learned_nodes)} learned and {len(rep.architectural_nodes)} architectural "
             f"verified nodes; {rep.thresholds.describe()}"]
    for n in rep.nodes:
        iia = (f", {'graded (logit-level) ' if n.level == 'logit' else ''}IIA {n.iia:.2f}" if n.iia is not None
               else "")
        kind = "ARCHITECTURAL" if n.architectural else "VERIFIED"
        lines.append(f"  {kind} {n.site:<10} carries {' + '.join(n.features):<24} -> {', '.join(n.targets)} "
                     f"(effect {n.effect:.2f}{iia}{', jointly' if n.joint else ''}"
                     f"{', only with ' + ', '.join(x for x in n.group if x != n.site) if n.group else ''}"
                     f"{', confirmed on held-out inputs' if n.confirmed else ''}"
                     f"{'; predicted by ' + ' / '.join(n.prediction) if n.prediction else ''})")
    for v in rep.verdicts:
        if v.verified:
            continue
        lines.append(f"  rejected {v.site:<10} {' + '.join(v.features):<24} {_why_rejected(v)}")
    d = rep.controls_summary()
    lines.append("null controls: " + "; ".join(
        f"{c}: {s['verified']} of {s['tested']} verified" + (" (must be 0)" if s["must_verify_nothing"] else
                                                               " (= architectural claims)")
        for c, s in d.items()))
    rm = rep.settings.get("random_model")
    if rm:
        lines.append(f"random-init model: weight std {rm['init_std']}, {rm['distinct_predictions']} distinct "
                     f"predictions, top one on {rm['top_share']:.0%} of answers")
    return "\n".join(lines)


__all__ = ["VerifiedNode", "VerificationReport", "verify_hypotheses", "claim_hypothesis", "format_verification"]
