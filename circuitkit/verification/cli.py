"""``circuitkit verify``: interchange tests of hypotheses, with null controls beside every run."""
from __future__ import annotations

import argparse
from pathlib import Path

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError
from circuitkit.validate import check_out_file, check_range, check_threads, read_artifact


def register(sub: argparse._SubParsersAction) -> None:
    p = add_common(sub.add_parser("verify", help="verify hypotheses by interchange on fair (stratified) pairs: IIA, "
                                                 "moves, stable; null controls (random model, shuffled feature, proxy)"))
    p.add_argument("model", help="probed model checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hypotheses", help="JSON written by 'circuitkit hypothesize --out' (accepted ones are tested)")
    src.add_argument("--claim", action="append", nargs=2, metavar=("SITE", "FEATURE"),
                     help="test a claim directly, e.g. --claim a1.0@: 'count(query)' (repeatable)")
    p.add_argument("--task")
    p.add_argument("--inputs", type=int, default=3000, help="task inputs that bases and sources come from")
    p.add_argument("--pairs", type=int, default=200, help="base/source pairs per side (default 200)")
    p.add_argument("--min-effect", type=float, default=0.1,
                   help="CI low of change(f differs) − change(f agrees) (default 0.1)")
    p.add_argument("--min-iia", type=float, default=0.8, help="CI low of IIA on an answer f predicts (default 0.8)")
    p.add_argument("--max-change-agree", type=float, default=0.15,
                   help="CI high of the change rate when a fair source agrees on f (default 0.15)")
    p.add_argument("--no-controls", action="store_true", help="skip the null controls (not recommended)")
    p.add_argument("--max-group", type=int, default=12,
                   help="largest group of sites at one position patched together for a feature no single one of "
                        "them verifies (redundant carriers); 0 = no groups (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the full report (JSON) here")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> Output:
    import torch

    from circuitkit.hypotheses.records import HypothesisReport
    from circuitkit.io_utils import atomic_write_json
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.tasks.registry import check_same_task
    from circuitkit.verification.interchange import MAX_INPUTS, MAX_PAIRS, InterchangeVerifier, VerifyThresholds
    from circuitkit.verification.report import claim_hypothesis, format_verification, verify_hypotheses

    check_threads(args.threads)
    torch.set_num_threads(args.threads)
    check_range("--inputs", args.inputs, 4, MAX_INPUTS, hint=" (distinct task inputs drawn as bases)")
    check_range("--pairs", args.pairs, 1, MAX_PAIRS)
    check_range("--max-group", args.max_group, 0, 64)
    for name in ("min_effect", "min_iia", "max_change_agree"):
        check_range(f"--{name.replace('_', '-')}", getattr(args, name), 0, 1, hint=" (a rate)")
    check_out_file(args.out)
    report = None
    if args.hypotheses:
        path = Path(args.hypotheses)
        raw = read_artifact(path, "hypothesis report", "circuitkit hypothesize MODEL --out FILE")
        try:
            report = HypothesisReport.from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CircuitkitError(f"{str(path)!r} is not a hypothesis report ({type(e).__name__}: {e})") from None
    pm = load_probed(args.model, task=args.task, artefact=(raw, str(args.hypotheses)) if report else None)
    th = VerifyThresholds(min_effect=args.min_effect, min_iia=args.min_iia, max_change_agree=args.max_change_agree)
    ver = InterchangeVerifier(pm, n_inputs=args.inputs, n_pairs=args.pairs, thresholds=th, seed=args.seed)
    if report is not None:
        check_same_task(raw, pm.task, str(args.hypotheses))
        hyps = report.hypotheses
    else:
        hyps = []
        from circuitkit.sites import parse_site

        for site, f in args.claim:
            if parse_site(site).position is None:
                raise CircuitkitError(f"claim site {site!r} needs a position, e.g. {site}@{pm.task.position_names[-1]}")
            if f not in ver.features:
                raise CircuitkitError(f"unknown feature {f!r}; e.g. {', '.join(list(ver.features)[:12])} ...")
            hyps.append(claim_hypothesis(site, f))
    rep = verify_hypotheses(ver, hyps, controls=not args.no_controls, null_seed=args.seed, model_name=str(args.model),
                            max_group=args.max_group)
    data = rep.to_dict()
    if args.out:
        atomic_write_json(args.out, data)
        data["out"] = args.out
    return Output(data, format_verification(rep))
