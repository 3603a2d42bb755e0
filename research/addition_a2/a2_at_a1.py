"""Where the committed addition model reads A2 at A1: interchange IIA split by the answer's length, under
two rules for what a fair source holds fixed.

The paper's second addition claim is "A2 is computed at A1 from F2, S2 and the carry from column 3".
Answers are written left-aligned, so A2 means two things: on a 3-digit sum it is (F2 + S2 + carry(3))
mod 10; on a 4-digit sum (A1 = 1) it is the sum's hundreds digit, (F1 + S1 + carry(2)) mod 10.

The two rules:

* ``layout``: sources share the answer's length only (the verifier's rule until 2d797af). On a 3-digit
  sum the source then usually writes another A1 than the base. The model reads the base's written A1 at
  the patched position, and A1 = F1 + S1 + carry(2) there, so the patched heads bring operands that imply
  one carry(2) while the written digit states another.
* ``written``: sources also share the answer digits written at the site (A1 at A1): the verifier's rule now
  (``AdditionTask.holds_fixed``).

For each rule and a few site groups at A1 and feature sets, the script runs the verifier's own test
(``InterchangeVerifier.test``, on the search and the held-out confirm half, with the case study's settings:
3,000 inputs, 200 pairs, seed 0) and splits the IIA on the same pairs by the base's answer length.

    .venv/bin/python research/addition_a2/a2_at_a1.py            # writes research/addition_a2/results.json
    .venv/bin/python research/addition_a2/a2_at_a1.py --verification runs/full/addition/circuit/verification.json
        # also the site groups at A1 that a case-study run verified for A2
    .venv/bin/python research/addition_a2/a2_at_a1.py --group "m0@A1 & m1@A1 & a1.2@A1 & a1.1@A1" \
        --only-verification --pairs 600 --out research/addition_a2/results_run_group_600.json
        # the full run's group only, on 3x the pairs (writes results_run_group_600.json)
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from circuitkit.manifest import build_manifest
from circuitkit.models.checkpoint import ProbedModel, load_probed
from circuitkit.sites import group_name, group_sites
from circuitkit.stats import proportion
from circuitkit.tasks.addition import AdditionTask
from circuitkit.tasks.base import LAYOUT
from circuitkit.verification.interchange import InterchangeVerifier

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[1] / "case_studies" / "models" / "addition"

L0 = " & ".join(f"a0.{h}@A1" for h in range(4))
L1 = " & ".join(f"a1.{h}@A1" for h in range(4))
JOINT = ["F1+S1", "F2+S2", "carry(3)"]
#: (site group, features) tested
TESTS = [
    (L0, ["carry(3)"]), (L0, ["F2+S2", "carry(3)"]),
    (L1, ["F2+S2"]), (L1, ["F2+S2", "carry(3)"]), (L1, JOINT),
    (f"{L0} & {L1}", ["F2+S2", "carry(3)"]), (f"{L0} & {L1}", JOINT),
    ("m1@A1 & a0.0@A1 & a1.1@A1", JOINT),  # the group the full run found under the layout rule (at 52dc844)
    ("m1@A1 & a1.2@A1 & a1.1@A1", JOINT),  # the group the full run found under the written rule (at 2d797af)
]
RULES = ("layout", "written")


class LayoutOnlyAddition(AdditionTask):
    """The addition task with the earlier fair-source rule: the answer's length only."""

    def holds_fixed(self, features: Sequence[str], position: str | int | None = None) -> tuple[str, ...]:
        return (LAYOUT,)


def answer_digits(text: str) -> int:
    """Digits of the sum in ``B615+861=1476E`` (3 or 4)."""
    return len(text.split("=")[1].split("E")[0])


def split_iia(v: InterchangeVerifier, spec: str, features: list[str], split: str, rule: str = "written") -> dict:
    """The verifier's own test of ``spec`` carrying ``features`` on one half of the inputs (its A2 IIA and
    verdict), and the IIA on the very same f-differing pairs split by the base's answer length."""
    sites = group_sites(spec)
    verdict = v.test(spec, features, split=split)
    pooled = next((t for t in verdict.targets if t.target == "A2"), None)
    db, ds, _, _ = v._pair_cache[(group_name(sites), tuple(features), split, False)]  # the pairs test() used
    am = v.answer_model(sites[0], features, "A2")
    hits: dict[int, list[float]] = {3: [], 4: []}
    if am is not None and db:
        pred = v._patched_logits(sites, db, ds).argmax(-1)
        wants, _ = v.predictions(sites[0], features, am, db, ds)  # the verifier's own predictions for these pairs
        for r, i, pos, want in wants:
            hits[answer_digits(v.inputs[i])].append(float(int(pred[r, pos]) == want))
    by_len = {f"iia_{k}_digit_sums": proportion(np.array(h), 0.95).to_dict() if h else None for k, h in hits.items()}
    return {"rule": rule, "hold": list(verdict.hold), "site": spec, "features": features, "split": split,
            "answer_context": list(am.context) if am else None,
            "iia": pooled.iia.to_dict() if pooled is not None and pooled.iia else None,
            "verified": bool(pooled is not None and pooled.verified), **by_len}


def verified_groups(path: Path) -> list[tuple[str, list[str]]]:
    """(site group, features) of every site group at A1 that a run verified with A2 among its answers."""
    nodes = json.loads(path.read_text())["nodes"]
    out = {(group_name(group_sites(" & ".join(n["group"]))), tuple(n["features"])) for n in nodes
           if n.get("group") and n["site"].endswith("@A1") and "A2" in n.get("targets", [])}
    return [(spec, list(feats)) for spec, feats in sorted(out)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--inputs", type=int, default=3000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--verification", metavar="JSON", help="also test (written rule) the site groups at A1 that this "
                    "verification.json verified for A2 (a case-study run's <work>/circuit/verification.json)")
    ap.add_argument("--group", metavar="SPEC", help='also test this site group at A1 (written rule), e.g. '
                    '"m0@A1 & m1@A1 & a1.2@A1 & a1.1@A1", for --features')
    ap.add_argument("--features", default="F1+S1,F2+S2,carry(3)", help="the features --group is tested for")
    ap.add_argument("--only-verification", action="store_true", help="test only the --verification / --group groups "
                    "(e.g. with more --pairs, to narrow their intervals on 3-digit sums)")
    args = ap.parse_args()
    if args.only_verification and not (args.verification or args.group):
        ap.error("--only-verification needs --verification JSON or --group SPEC")
    torch.manual_seed(args.seed)
    pm = load_probed(args.model)
    verifiers = {"written": InterchangeVerifier(pm, n_inputs=args.inputs, n_pairs=args.pairs, seed=args.seed),
                 "layout": InterchangeVerifier(ProbedModel(pm.hf_model, LayoutOnlyAddition(), pm.path, pm.meta),
                                               n_inputs=args.inputs, n_pairs=args.pairs, seed=args.seed)}
    rows = []
    fmt = lambda e: "-" if e is None else f"{e['mean']:.3f} [{e['ci_low']:.3f}] n {e['n']}"  # noqa: E731
    tests = [] if args.only_verification else [(rule, spec, feats) for rule in RULES for spec, feats in TESTS]
    if args.verification:
        tests += [("written", spec, feats) for spec, feats in verified_groups(Path(args.verification))]
    if args.group:
        tests.append(("written", args.group, [f for f in args.features.split(",") if f]))
    for rule, spec, feats in tests:
        for split in ("search", "confirm"):
            row = split_iia(verifiers[rule], spec, feats, split, rule)
            rows.append(row)
            print(f"{rule:7s} {spec[:44]:44s} {'+'.join(feats):22s} {split:7s} IIA {fmt(row['iia'])} "
                  f"({'verified' if row['verified'] else 'not verified'})  3-digit "
                  f"{fmt(row['iia_3_digit_sums'])}  4-digit {fmt(row['iia_4_digit_sums'])}", flush=True)
    out = {"rows": rows, "manifest": build_manifest("research_addition_a2", args.seed, vars(args))}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
