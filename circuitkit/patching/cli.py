"""``circuitkit patch`` (node / sweep / path / attribution patching) and ``circuitkit patch-table``."""
from __future__ import annotations

import argparse

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError

#: most examples per contrast for the counting table (the paper used 1,000; each is patched 8 times)
MAX_TABLE_N = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    p = add_common(sub.add_parser(
        "patch", help="activation / path / attribution patching on a probed model",
        description="Patch sites of a base input with values from a source (interchange), a resample, the mean "
                    "of a reference set or zeros, and report a metric per example with bootstrap CIs. Modes: "
                    "--site (node patching, all sites at once), --sweep KIND (every layer x position [x head]), "
                    "--sender/--receiver (path patching), --attribution (gradient screen of all nodes and edges)."))
    p.add_argument("model_dir", help="probed model checkpoint directory")
    p.add_argument("--task", help="task (default: read from the checkpoint)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--site", nargs="+", help="site(s) with positions, e.g. a1.0@: x0.pre@Q pos@:")
    mode.add_argument("--sweep", metavar="KIND", help="resid_pre resid_mid resid_post attn_out mlp_out head z q k v "
                                                      "pattern")
    mode.add_argument("--sender", help="path patching: the sender site, e.g. a0.1@6")
    mode.add_argument("--attribution", action="store_true", help="attribution-patching screen of nodes and edges")
    p.add_argument("--receiver", help="path patching: a1.0 | q1.0 | m1 | logits (optionally @POS)")
    p.add_argument("--receiver-input", default="resid", help="q, k, v or resid (= q, k and v) for head receivers")
    p.add_argument("--ablation", default="interchange", help="interchange (default), resample, mean or zero")
    p.add_argument("--metric", default="logit_diff", help="logit_diff, logit, prob, kl, accuracy or loss")
    p.add_argument("--target", help="which answer the metric reads (default: the task's)")
    p.add_argument("--base", nargs="+", help="base input texts (default: --n test-split inputs)")
    p.add_argument("--source", nargs="+", help="source input texts, one per base input (default: --contrast)")
    p.add_argument("--contrast", default="minimal", choices=["minimal", "random"],
                   help="how default sources are made: minimal edit (F) or random same-length input (R)")
    p.add_argument("--n", type=int, default=200, help="number of test-split base inputs when --base is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="cells / edges to list in the text output")
    p.add_argument("--out", help="also write the full result as JSON here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_patch)

    t = add_common(sub.add_parser(
        "patch-table", help="the paper's counting table: cumulative group patching under contrasts R and F"))
    t.add_argument("model_dir", help="counting model checkpoint directory")
    t.add_argument("--n", type=int, default=1000, help="examples per contrast")
    t.add_argument("--contrasts", default="R,F")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="directory for counting_patch_table.md / .json")
    t.add_argument("--device", default="cpu")
    t.set_defaults(handler=_table)


def _inputs(args: argparse.Namespace, pm, need_source: bool) -> tuple[list[str], list[str] | None]:
    """Bases and sources from --base/--source, else --n test inputs and their --contrast (patching/inputs.py)."""
    from circuitkit.patching.inputs import bases_and_sources

    return bases_and_sources(pm.task, args.base, args.source, args.n, args.contrast, args.seed, need_source,
                             ("--base", "--source"))


def _patch(args: argparse.Namespace) -> Output:
    from circuitkit.io_utils import atomic_write_json
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.validate import check_out_file, check_range

    check_range("--n", args.n, 1)
    check_range("--top", args.top, 0)
    check_out_file(args.out)
    pm = load_probed(args.model_dir, task=args.task, device=args.device)
    if args.sender or args.receiver:
        if not (args.sender and args.receiver):
            raise CircuitkitError("path patching needs both --sender and --receiver")
        data, text = _path(args, pm)
    elif args.sweep:
        data, text = _sweep(args, pm)
    elif args.attribution:
        data, text = _attribution(args, pm)
    else:
        data, text = _node(args, pm)
    if args.out:
        atomic_write_json(args.out, data)
        text += f"\nwrote {args.out}"
    return Output(data, text)


def _fmt(est: dict) -> str:
    return f"{est['mean']:.3f} [{est['ci_low']:.3f}, {est['ci_high']:.3f}]"


def _node(args, pm):
    from circuitkit.patching.inputs import reference_inputs
    from circuitkit.patching.node import patch_nodes

    base, src = _inputs(args, pm, args.ablation == "interchange")
    ref = reference_inputs(pm.task, len(base), args.ablation, args.seed)
    r = patch_nodes(pm, base, args.site, args.ablation, src, ref, args.metric, args.target, args.seed)
    d = r.to_dict()
    text = (f"{', '.join(d['sites'])} ({d['ablation']}, {d['metric']}, n={d['n']}, 95% bootstrap CI)\n"
            f"  clean   {_fmt(d['clean'])}\n  patched {_fmt(d['patched'])}\n  effect  {_fmt(d['effect'])} "
            "(clean - patched)")
    return d, text


def _sweep(args, pm):
    from circuitkit.patching.inputs import reference_inputs
    from circuitkit.patching.sweep import sweep

    base, src = _inputs(args, pm, args.ablation == "interchange")
    ref = reference_inputs(pm.task, len(base), args.ablation, args.seed)
    r = sweep(pm, base, args.sweep, src, args.ablation, ref, args.metric, args.target, seed=args.seed,
              progress=not args.quiet)
    d = r.to_dict()
    eff = (r.base.mean() - r.mean())
    order = eff.abs().flatten().argsort(descending=True)[: args.top]
    lines = [f"sweep {args.sweep} over {' x '.join(r.axis_names)} {tuple(r.mean().shape)} ({d['ablation']}, "
             f"{d['metric']}, n={d['n']}); unpatched mean {d['base_mean']:.3f}; top cells by |effect|:"]
    for i in order.tolist():
        idx = list(zip(r.axis_names, [int(x) for x in _unravel(i, tuple(r.mean().shape))]))
        lines.append("  " + " ".join(f"{a}={v}" for a, v in idx) + f": patched {float(r.mean().flatten()[i]):.3f}"
                     f"  effect {float(eff.flatten()[i]):.3f}")
    return d, "\n".join(lines)


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return out[::-1]


def _path(args, pm):
    from circuitkit.patching.path import path_patch

    base, src = _inputs(args, pm, True)
    r = path_patch(pm, base, src, args.sender, args.receiver, args.receiver_input, args.metric, args.target)
    d = r.to_dict()
    text = (f"path {d['sites'][0]} ({d['metric']}, n={d['n']}, 95% bootstrap CI)\n  clean   {_fmt(d['clean'])}\n"
            f"  patched {_fmt(d['patched'])}\n  effect  {_fmt(d['effect'])} (clean - patched)")
    return d, text


def _attribution(args, pm):
    from circuitkit.patching.attribution import attribute

    base, src = _inputs(args, pm, True)
    r = attribute(pm, base, src, args.metric, args.target)
    d = r.to_dict()
    cells = [(node, p, float(v)) for node, m in r.node_means().items() for p, v in enumerate(m.tolist())]
    cells.sort(key=lambda c: -abs(c[2]))
    edges = sorted(r.edge_means().items(), key=lambda kv: -abs(kv[1]))
    lines = [f"attribution patching ({d['metric']}, n={d['n']}): estimated change of the metric", "top nodes:"]
    lines += [f"  {n}@{p}: {v:.3f}" for n, p, v in cells[: args.top]]
    lines += ["top edges:"] + [f"  {e}: {v:.3f}" for e, v in edges[: args.top]]  # "sender -> receiver"
    return d, "\n".join(lines)


def _table(args: argparse.Namespace) -> Output:
    from circuitkit.models.checkpoint import load_probed, read_meta
    from circuitkit.paper.counting_table import counting_table, to_markdown, write_table
    from circuitkit.validate import check_out_dir, check_range

    check_range("--n", args.n, 1, MAX_TABLE_N)
    check_out_dir(args.out)
    contrasts = [c.strip() for c in args.contrasts.split(",") if c.strip()]
    bad = sorted(set(contrasts) - {"R", "F"})
    if bad or not contrasts:
        raise CircuitkitError(f"--contrasts {args.contrasts!r}: valid contrasts are R (random) and F (flip), "
                              "comma-separated, e.g. R,F")
    # the table is the counting task's: a bare checkpoint (no circuitkit.json) is read as one; a checkpoint
    # that names another task keeps it, and the table then says it needs a counting model
    named = "task" in read_meta(args.model_dir)
    pm = load_probed(args.model_dir, task=None if named else "counting", device=args.device)
    res = counting_table(pm, args.n, contrasts, args.seed)
    data = write_table(res, args.out, {"model": args.model_dir, "n": args.n, "seed": args.seed})
    return Output(data, to_markdown(res, f"Counting: cumulative patching ({args.model_dir}, n={args.n})")
                  + f"\nwrote {args.out}/counting_patch_table.md and .json")
