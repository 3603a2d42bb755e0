"""``circuitkit discover`` (one method's edge circuit, MIB JSON) and ``circuitkit compare`` (circuits side by side)."""
from __future__ import annotations

import argparse
from pathlib import Path

from circuitkit.cli import Output, add_common


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="probed model checkpoint directory")
    p.add_argument("--task", help="task (default: read from the checkpoint)")
    p.add_argument("--n", type=int, default=100, help="base inputs (test split), each with one aligned source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", default="resample", help="resample (aligned source, default), mean or zero")
    p.add_argument("--sources", default="same-layout",
                   help="where resample sources come from: same-layout (default) or any-layout (another layout "
                        "whose named positions line up with the base's, e.g. a tracr input of another length)")
    p.add_argument("--metric", default="logit_diff", help="logit_diff (default), logit, prob, loss")
    p.add_argument("--device", default="cpu")


def register(sub: argparse._SubParsersAction) -> None:
    from circuitkit.discovery.methods import METHODS

    d = add_common(sub.add_parser(
        "discover", help="score every edge with EAP, EAP-IG, exact patching or ACDC; write an MIB circuit file",
        description="Score every sender -> receiver-input edge (q, k, v apart) of the model on aligned base/source "
                    f"pairs with one method ({', '.join(METHODS)}) and write DIR/METHOD.json in the MIB "
                    "circuit-track format (scores, in_graph) with the run's settings and a manifest."))
    _common(d)
    d.add_argument("--method", required=True, nargs="+", choices=list(METHODS), metavar="METHOD",
                   help=f"one or more of {', '.join(METHODS)}")
    d.add_argument("--steps", type=int, default=5, help="integrated-gradient steps (eap-ig-*)")
    d.add_argument("--tau", type=float, default=0.01, help="ACDC's KL threshold")
    d.add_argument("--out", required=True, help="directory for METHOD.json (created)")
    d.set_defaults(handler=_discover)

    c = add_common(sub.add_parser(
        "compare", help="score circuits side by side (MIB CPR / CMD, faithfulness at one size, ROC AUC)",
        description="Score circuit files (from `circuitkit discover`, or a run's circuit.json) on the same inputs: "
                    "MIB CPR and CMD over the k grid, each circuit's own size and faithfulness, every method's "
                    "faithfulness at circuitkit's edge count, and, for a model with ground_truth.json (tracr), "
                    "the edge ROC AUC. Writes comparison.json, comparison.md and comparison.png."))
    _common(c)
    c.add_argument("circuits", nargs="+", help="circuit files or directories holding them")
    c.add_argument("--out", required=True, help="directory for comparison.json / .md / .png")
    c.set_defaults(handler=_compare)


def _settings(method: str, args: argparse.Namespace) -> dict:
    from circuitkit.validate import check_range

    if method.startswith("eap-ig"):
        check_range("--steps", args.steps, 1, 1000)
        return {"steps": args.steps}
    if method == "acdc":
        check_range("--tau", args.tau, 0.0)
        return {"tau": args.tau}
    return {}


def _problem(args: argparse.Namespace):
    from circuitkit.discovery.problem import build_problem
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.validate import check_range

    check_range("--n", args.n, 1, 100_000)
    pm = load_probed(args.model_dir, task=args.task, device=args.device)
    p, record = build_problem(pm, args.n, args.seed, args.ablation, args.metric, args.sources)
    return pm, p, {**record, "model": str(args.model_dir), "task": pm.task.name}


def _discover(args: argparse.Namespace) -> Output:
    from circuitkit.discovery.harness import discovery_file
    from circuitkit.io_utils import atomic_dir, atomic_write_json
    from circuitkit.manifest import write_manifest
    from circuitkit.validate import check_out_dir

    check_out_dir(args.out)
    settings = {m: _settings(m, args) for m in args.method}
    _, p, record = _problem(args)
    lines, files = [], {}
    for m in args.method:
        files[m] = discovery_file(p, m, settings[m], record)
        meta = files[m]["circuitkit"]
        kept = sum(e["in_graph"] for e in files[m]["edges"].values())
        lines.append(f"{m}: {len(files[m]['edges'])} edges scored in {meta['seconds']:.2f} s; in_graph {kept} "
                     f"({meta['in_graph']})")
    with atomic_dir(args.out) as tmp:
        for m, d in files.items():
            atomic_write_json(Path(tmp) / f"{m}.json", d)
        write_manifest(tmp, "discover", args.seed, {"methods": settings, **{k: v for k, v in record.items()
                                                                             if k != "examples"}})
    return Output({"out": args.out, "methods": {m: d["circuitkit"] for m, d in files.items()}},
                  "\n".join(lines + [f"wrote {', '.join(f'{m}.json' for m in files)} in {args.out}"]))


def _compare(args: argparse.Namespace) -> Output:
    from circuitkit.discovery.harness import compare, curve_png, load_entries, to_markdown
    from circuitkit.io_utils import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
    from circuitkit.manifest import write_manifest
    from circuitkit.validate import check_out_dir, read_json

    check_out_dir(args.out)
    pm, p, record = _problem(args)
    entries = load_entries(p.graph, args.circuits)
    truth_file = Path(args.model_dir) / "ground_truth.json"
    truth = read_json(truth_file, "ground truth") if truth_file.is_file() else None
    cmp = compare(p, entries, truth)
    cmp["inputs"] = record
    md = to_markdown(cmp)
    with atomic_dir(args.out) as tmp:
        atomic_write_json(Path(tmp) / "comparison.json", cmp)
        atomic_write_text(Path(tmp) / "comparison.md", md + "\n")
        if any("curve" in r for r in cmp["rows"]):
            atomic_write_bytes(Path(tmp) / "comparison.png", curve_png(cmp))
        write_manifest(tmp, "compare", args.seed, {k: v for k, v in record.items() if k != "examples"},
                       circuits=[str(c) for c in args.circuits])
    return Output(cmp, md + f"\n\nwrote comparison.json, comparison.md and comparison.png in {args.out}")
