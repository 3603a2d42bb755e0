"""``circuitkit hypothesize``: ranked hypotheses "site@pos carries feature f" from ε-preimages."""
from __future__ import annotations

import argparse
import random

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_common(sub.add_parser("hypothesize", help="rank hypotheses 'site@pos carries feature f' from ε-preimages"))
    p.add_argument("model", help="probed model checkpoint directory")
    p.add_argument("--task", help="task (default: from the checkpoint)")
    p.add_argument("--sites", help="comma-separated sites, e.g. a0.0,a1.0@: (default: every head and MLP)")
    p.add_argument("--positions", help="positions for sites given without one, e.g. =,A1,A2")
    p.add_argument("--queries", type=int, default=60, help="query inputs from the test split (default 60)")
    p.add_argument("--source", choices=["pool", "decoder"], default="pool",
                   help="pool: exact preimages over task inputs (default); decoder: InversionView samples")
    p.add_argument("--pool", type=int, default=20000, help="pool size for --source pool (default 20000)")
    p.add_argument("--decoder", help="decoder directory for --source decoder")
    p.add_argument("--per-cell", type=int, default=256, help="decoder samples per grid cell (paper 256)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--fdr", type=float, default=0.05, help="Benjamini-Hochberg level (default 0.05)")
    p.add_argument("--min-kappa", type=float, default=0.4,
                   help="chance-corrected agreement (agreement - baseline)/(1 - baseline) (default 0.4)")
    p.add_argument("--min-lift", type=float, default=1.25)
    p.add_argument("--top", type=int, default=5, help="hypotheses shown per site in text output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the full report (JSON) here")
    p.set_defaults(handler=_hypothesize)


def _check_options(args: argparse.Namespace) -> None:
    """Every numeric option in its range, and --out writable, before any model is loaded."""
    from circuitkit.inversion.preimage import MAX_PER_CELL
    from circuitkit.validate import check_out_file, check_positive, check_range, check_threads

    for name in ("queries", "pool"):
        check_positive(f"--{name}", getattr(args, name))
    check_range("--per-cell", args.per_cell, 1, MAX_PER_CELL)
    check_range("--eps", args.eps, 0, lo_open=True, hint=" (a relative distance; the paper's 0.1)")
    check_range("--fdr", args.fdr, 0, 1, lo_open=True, hint=" (a false discovery rate)")
    check_range("--min-kappa", args.min_kappa, -1, 1, hint=" (a chance-corrected agreement)")
    check_range("--min-lift", args.min_lift, 0)
    check_range("--top", args.top, 0)
    check_threads(args.threads)
    check_out_file(args.out)


def _hypothesize(args: argparse.Namespace) -> Output:
    import torch

    from circuitkit.hypotheses.preimage_sources import DecoderPreimage, PoolPreimage
    from circuitkit.hypotheses.records import Thresholds
    from circuitkit.hypotheses.scoring import format_report, generate_hypotheses
    from circuitkit.io_utils import atomic_write_json
    from circuitkit.models.checkpoint import load_probed

    _check_options(args)
    torch.set_num_threads(args.threads)
    if args.source == "decoder":
        if not args.decoder:
            raise CircuitkitError("--source decoder needs --decoder DIR (train one with 'circuitkit decoder train')")
        from circuitkit.inversion.checkpoint import load_checked_decoder

        td = load_checked_decoder(args.decoder, args.model)
        pm = td.probed
        source = DecoderPreimage(td, n_per_cell=args.per_cell, eps=args.eps, seed=args.seed)
    else:
        pm = load_probed(args.model, task=args.task)
        source = PoolPreimage(pm, pool_size=args.pool, eps=args.eps, seed=args.seed)
    from circuitkit.sites import expand_sites

    sites = expand_sites(args.sites, args.positions, pm)
    test = list(pm.task.split("test"))
    queries = random.Random(args.seed).sample(test, min(args.queries, len(test)))
    th = Thresholds(fdr=args.fdr, min_kappa=args.min_kappa, min_lift=args.min_lift)
    rep = generate_hypotheses(pm, sites, queries, source, thresholds=th, seed=args.seed, model_name=str(args.model))
    data = rep.to_dict()
    if args.out:
        atomic_write_json(args.out, data)
        data["out"] = args.out
    return Output(data, format_report(rep, args.top))
