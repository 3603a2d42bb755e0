"""``circuitkit run CASE``: one case study end to end, from model to report."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError
from circuitkit.pipeline.config import available_cases


def register(sub: argparse._SubParsersAction) -> None:
    p = add_common(sub.add_parser("run", help="run a case study end to end (model -> ... -> report)"))
    p.add_argument("case", help=f"case study name ({', '.join(available_cases())}) or a path to a .toml file")
    p.add_argument("--quick", action="store_true", help="small settings: minutes on 2 CPU cores")
    p.add_argument("--out", help="report directory (default: ./reports/CASE, or ./reports/CASE-quick with --quick)")
    p.add_argument("--work", help="stage cache directory (default: ./runs/CASE[-quick]); rerun to resume")
    p.add_argument("--decoder", help="use this trained decoder for the case's model instead of training one "
                   "(overrides [decoder] path; it is checked against the model and its hit rate evaluated)")
    p.add_argument("--model", help="run the case on this probed-model checkpoint directory instead of the one its "
                   "[model] section names (e.g. another seed of the same task, to test that a finding survives)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the CPUs other jobs leave free, "
                   "re-read before each stage; pass a number for bit-identical reruns)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run)


def _precheck_inputs(cfg) -> None:
    """The model and decoder a case reads are checked (files whole, checksums, no pickle read) before any
    stage runs, so a corrupt decoder is not found only after the model stage has run."""
    from circuitkit.inversion.checkpoint import check_decoder_dir
    from circuitkit.validate import check_weight_dir

    if cfg.model.source == "path":
        src = cfg.resolve(cfg.model.path)
        if not (src / "config.json").is_file():
            raise CircuitkitError(f"[model] path {cfg.model.path!r} is not a checkpoint directory (no config.json at "
                                  f"{str(src)!r})")
        check_weight_dir(src)
    if cfg.decoder.path:
        check_decoder_dir(cfg.resolve(cfg.decoder.path))


def _run(args: argparse.Namespace) -> Output:
    import sys

    from circuitkit.pipeline.config import load_case
    from circuitkit.pipeline.run import run_case
    from circuitkit.validate import check_device, check_out_dir, check_threads

    check_out_dir(args.out)
    check_out_dir(args.work, "--work")
    check_device(args.device)
    check_threads(args.threads)
    cfg = load_case(args.case, quick=args.quick)
    if args.decoder:
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, path=str(Path(args.decoder).resolve())))
    if args.model:
        if not (Path(args.model) / "config.json").exists():
            raise CircuitkitError(f"--model {args.model!r} is not a checkpoint directory (no config.json); give a "
                                  "directory written by 'circuitkit model train' or save_pretrained")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source="path", path=str(Path(args.model).resolve())))
    _precheck_inputs(cfg)
    suffix = "-quick" if args.quick else ""
    out = Path(args.out) if args.out else Path("reports") / f"{cfg.name}{suffix}"
    work = Path(args.work) if args.work else Path("runs") / f"{cfg.name}{suffix}"
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    res = run_case(cfg, out, work, device=args.device, progress=not args.quiet, log=log, threads=args.threads)
    return Output(res, f"done: {res['out']}/index.html ({res['seconds']:.0f} s)")
