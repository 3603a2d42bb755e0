"""A circuit scored against a compiled model's ground truth (a tracr model's ``ground_truth.json``).

The ground truth names every head and MLP the program compiled into, the RASP variables each writes, and the
edges between them (``models/from_tracr.py: ground_truth``).  An ablation can only find what it moves: under
resample ablation from same-layout sources (circuitkit's pairs), a component whose output is the same on every
base and source (tracr-reverse's length sub-circuit, constant at a fixed length) has nothing to patch.  So the
truth is scored twice:

| truth | what it holds |
|---|---|
| ``visible`` | components whose output differs between base and source on some pair (measured on the model), edges into a visible component (or the output) from a visible sender, or from the embeddings when what the receiver reads of them (its query / key / value or MLP input weights applied to the embeddings) differs on some pair |
| ``full`` | every component and edge the program compiled |

The circuit is read at the level of components: a site node ``a3.0@x1`` is component ``a3.0``; ``x0.pre@...``
is the embeddings (``emb``); the answer nodes are ``out``; every other residual node stands for a bundle of
earlier components and is left out of precision and recall (counted apart).  Labels: a verified node at a
component's site is right when every feature it carries is a variable that component writes; at a residual site,
when every feature is a variable the stream holds there (the embeddings' and what earlier components wrote).
tracr's ``selector_width`` writes its attention output (``<v>_selector_width_attn_output``, 1 / (width + 1) in
one direction) to a hidden space that the next MLP decodes into ``<v>``; that output is a one-to-one code of
``<v>``, so a label ``<v>`` on that head counts as right.  So does a label that is the same partition of the
inputs as a variable held there, at that position, on every input of the task's table (``frac_prevs_1`` at x1 is
``map_3`` at x1: no test can tell them apart); the score names such aliases.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuitkit.discovery.problem import aligned_pairs
from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.results import JsonResult, to_jsonable
from circuitkit.sites import parse_site

TRUTH_FILE = "ground_truth.json"
#: the embeddings' own variables in a tracr model (tokens, positions and the constant ``one`` direction)
EMBEDDED = ("tokens", "indices", "one")
#: suffix tracr gives a selector_width's hidden attention output (a one-to-one code of the width variable)
SELECTOR_WIDTH_CODE = "_selector_width_attn_output"
#: largest absolute change of a component's output still counted as "the same" between base and source
SAME = 1e-5


def read_truth(model_dir: str | Path | None) -> dict[str, Any] | None:
    """The ground truth a model directory holds, or None when it holds none; a malformed file is an error."""
    if model_dir is None or not (Path(model_dir) / TRUTH_FILE).is_file():
        return None
    file = Path(model_dir) / TRUTH_FILE
    try:
        truth = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CircuitkitError(f"{str(file)!r} is not valid JSON ({e}); rewrite it with 'circuitkit model "
                              "from-tracr'") from None
    if not isinstance(truth, dict) or not isinstance(truth.get("components"), dict) or \
            not isinstance(truth.get("edges"), list):
        raise CircuitkitError(f"{str(file)!r} lacks 'components' and 'edges'; rewrite it with 'circuitkit model "
                              "from-tracr'")
    return truth


def _hook(name: str, comp: Mapping[str, Any]) -> tuple[str, int | None]:
    """The cache hook of a ground-truth component and its head index (None: an MLP)."""
    site = parse_site(name)
    if comp.get("kind") == "head":
        return f"blocks.{site.layer}.attn.hook_result", site.head
    return f"blocks.{site.layer}.hook_mlp_out", None


@torch.no_grad()
def moved_components(pm: ProbedModel, truth: Mapping[str, Any], n: int = 200, seed: int = 0,
                     sources: str = "same-layout") -> dict[str, float]:
    """{component: the largest change of its output [over pairs, positions, d_model]} between bases and their
    sources (``discovery.problem.aligned_pairs``, same-layout by default): what resample ablation can move at
    all."""
    comps = truth["components"]
    hooks = {name: _hook(name, c) for name, c in comps.items()}
    bases, srcs = aligned_pairs(pm, n, seed, sources)
    names = sorted({h for h, _ in hooks.values()})
    _, base = pm.runner.run(pm.task.encode(bases).to(pm.device), cache=names)
    _, src = pm.runner.run(pm.task.encode(srcs).to(pm.device), cache=names)
    out = {}
    for name, (hook, head) in hooks.items():
        a, b = (base[hook], src[hook]) if head is None else (base[hook][:, :, head], src[hook][:, :, head])
        out[name] = float((a - b).abs().max())
    return out


@torch.no_grad()
def moved_embedding_reads(pm: ProbedModel, truth: Mapping[str, Any], n: int = 200, seed: int = 0
                          ) -> dict[str, float]:
    """{component reading the embeddings: the largest change, between same-layout bases and sources, of what it
    reads of them}: a head reading only positions, ``one`` and BOS's token direction reads the same on both."""
    bases, sources = aligned_pairs(pm, n, seed)
    r = pm.runner
    xb, xs = (r.embed(pm.task.encode(t).to(pm.device)) for t in (bases, sources))  # [n, seq, d_model]
    out = {}
    for e in truth["edges"]:
        if e["sender"] != "emb" or e["receiver"] not in truth["components"]:
            continue
        c, site = truth["components"][e["receiver"]], parse_site(e["receiver"])
        w = r.layers[site.layer]
        reads = [w.W_Q[site.head], w.W_K[site.head], w.W_V[site.head]] if c.get("kind") == "head" else [w.W_in]
        out[e["receiver"]] = max(float(((xb - xs) @ m).abs().max()) for m in reads)  # m: [d_model, d_in]
    return out


def _stream(truth: Mapping[str, Any], site: str) -> set[str]:
    """The variables a residual site holds: the embeddings' and those of every component before it."""
    s = parse_site(site)
    before = {"resid_pre": (s.layer, -1), "resid_mid": (s.layer, 0), "resid_post": (s.layer, 1)}[s.kind]
    held = set(EMBEDDED)
    for c in truth["components"].values():
        order = (int(c["layer"]), 0 if c.get("kind") == "head" else 1)
        if order <= before:
            held.update(c.get("writes", []))
    return held


def _with_codes(held: set[str]) -> set[str]:
    """The variables held, plus each variable whose one-to-one code is held (``<v>`` for ``<v>_selector_width_attn_output``)."""
    return held | {v[: -len(SELECTOR_WIDTH_CODE)] for v in held if v.endswith(SELECTOR_WIDTH_CODE)}


def _component_of(node: str) -> str | None:
    """A circuit node's component (``a3.0``, ``m2``), ``emb`` for the embeddings, ``out`` for an answer, None for a
    residual bundle."""
    if node.startswith("out:"):
        return "out"
    site = parse_site(node)
    if site.kind == "head":
        return f"a{site.layer}.{site.head}"
    if site.kind == "mlp_out":
        return f"m{site.layer}"
    if site.kind == "resid_pre" and site.layer == 0:
        return "emb"
    return None


def _pr(found: set[str], truth: set[str]) -> dict[str, Any]:
    """Precision, recall and the sets behind them (None where a set is empty)."""
    hit = found & truth
    return {"precision": round(len(hit) / len(found), 4) if found else None,
            "recall": round(len(hit) / len(truth), 4) if truth else None,
            "missed": sorted(truth - found), "extra": sorted(found - truth)}


@dataclass
class GroundTruthScore(JsonResult):
    """The circuit beside the program's ground truth (module doc)."""

    moved: dict[str, float]
    visible_components: list[str]
    nodes: dict[str, dict[str, Any]]  # "visible" / "full" -> precision, recall, missed, extra
    edges: dict[str, dict[str, Any]]  # edges named "sender → receiver" (components, emb, out)
    labels: list[dict[str, Any]]  # per verified node: site, features, what the truth holds there, right
    bundles: int  # residual nodes standing for bundles, left out of precision and recall
    notes: list[str] = field(default_factory=list)

    @property
    def labels_right(self) -> tuple[int, int]:
        """(verified labels that name a variable the truth puts at their site, verified labels)."""
        return sum(r["right"] for r in self.labels), len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        right, total = self.labels_right
        return to_jsonable({**asdict(self), "labels_right": right, "labels_total": total, "definitions": __doc__})


def same_partition(variables: Mapping[str, Mapping[str, list]], a: str, b: str, position: int) -> bool:
    """Whether RASP variables ``a`` and ``b`` take values in one-to-one correspondence at ``position`` (1-based)
    on every input of the table (``tasks/tracr.py``'s ``variables``)."""
    ta, tb = variables.get(a), variables.get(b)
    if not ta or not tb:
        return False
    fwd: dict[str, str] = {}
    back: dict[str, str] = {}
    for key, va in ta.items():
        vb = tb.get(key)
        if vb is None or len(va) < position:
            continue
        x, y = json.dumps(va[position - 1]), json.dumps(vb[position - 1])
        if fwd.setdefault(x, y) != y or back.setdefault(y, x) != x:
            return False
    return bool(fwd)


def _position_index(site: str) -> int | None:
    """x3 -> 3 (a tracr task's positions); None for any other position."""
    pos = parse_site(site).position
    return int(pos[1:]) if isinstance(pos, str) and pos[:1] == "x" and pos[1:].isdigit() else None


def score_against_truth(truth: Mapping[str, Any], moved: Mapping[str, float], nodes: Sequence[Mapping[str, Any]],
                        edges: Sequence[Mapping[str, Any]], variables: Mapping[str, Mapping[str, list]] | None = None,
                        embedding_reads: Mapping[str, float] | None = None) -> GroundTruthScore:
    """Node and edge precision / recall of a circuit (``circuit.json``'s nodes and edges) against the full and the
    visible truth, and whether each verified label names a variable the truth puts there (or, with the task's
    ``variables``, an alias of one at that position).  ``embedding_reads`` (``moved_embedding_reads``): an edge
    from the embeddings is visible only into a component whose read of them moves; without it, always."""
    comps = truth["components"]
    visible = {c for c, d in moved.items() if d > SAME}
    site_nodes = [n for n in nodes if n.get("kind", "site") == "site"]
    mapped = {n["id"]: _component_of(n["id"]) for n in site_nodes}
    found = {c for c in mapped.values() if c not in (None, "emb")}
    truth_edges = {f"{e['sender']} → {e['receiver']}" for e in truth["edges"]}
    emb_visible = (lambda c: True) if embedding_reads is None else (lambda c: embedding_reads.get(c, 0.0) > SAME)  # noqa: E731
    seen_edges = {f"{e['sender']} → {e['receiver']}" for e in truth["edges"]
                  if (e["receiver"] == "out" or e["receiver"] in visible) and
                  (e["sender"] in visible or (e["sender"] == "emb" and emb_visible(e["receiver"])))}
    circuit_edges = set()
    for e in edges:
        a = mapped.get(e["source"], _component_of(e["source"]) if e["source"].startswith("out:") else None)
        b = _component_of(e["target"]) if e["target"].startswith("out:") else mapped.get(e["target"])
        if a is not None and b not in (None, "emb") and a != b:
            circuit_edges.add(f"{a} → {b}")
    labels = []
    for n in site_nodes:
        feats = [f for f in n.get("features", []) if f != "unexplained"]
        if not feats:
            continue
        comp = mapped[n["id"]]
        held = set(comps[comp].get("writes", [])) if comp in comps else (
            _stream(truth, n["id"].split("@")[0]) if comp is None or comp == "emb" else set())
        held_here = _with_codes(held)
        pos = _position_index(n["id"])
        aliases = {f: a for f in feats if f not in held_here and variables and pos is not None
                   for a in sorted(held_here) if same_partition(variables, f, a, pos)}
        labels.append({"site": n["id"], "features": feats, "truth": sorted(held),
                       "right": set(feats) <= held_here | set(aliases), "aliases": aliases})
    notes = [f"{c} is constant between every base and its same-layout source (largest change {moved[c]:.1e}): "
             "resample ablation cannot see it" for c in comps if c not in visible]
    notes += [f"emb → {c}: what {c} reads of the embeddings is the same on every base and its same-layout source "
              f"(largest change {d:.1e}), so the edge is not visible" for c, d in (embedding_reads or {}).items()
              if c in visible and d <= SAME]
    return GroundTruthScore(dict(moved), sorted(visible),
                            {"visible": _pr(found, visible), "full": _pr(found, set(comps))},
                            {"visible": _pr(circuit_edges, seen_edges), "full": _pr(circuit_edges, truth_edges)},
                            labels, sum(1 for c in mapped.values() if c is None), notes)


def ground_truth_of_run(pm: ProbedModel, nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]],
                        seed: int = 0) -> GroundTruthScore | None:
    """The score of a run's circuit when its model directory holds a ground truth; None otherwise."""
    truth = read_truth(getattr(pm, "path", None))
    if truth is None:
        return None
    return score_against_truth(truth, moved_components(pm, truth, seed=seed), nodes, edges,
                               getattr(pm.task, "variables", None), moved_embedding_reads(pm, truth, seed=seed))


__all__ = ["GroundTruthScore", "TRUTH_FILE", "ground_truth_of_run", "moved_components", "moved_embedding_reads",
           "read_truth",
           "same_partition", "score_against_truth"]
