"""``circuitkit circuit``: assemble verified nodes into a circuit graph, evaluate it, export it."""
from __future__ import annotations

import argparse

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError
from circuitkit.validate import check_out_dir, check_range, check_threads, read_artifact
from circuitkit.verification.interchange import MAX_INPUTS, MAX_PAIRS


def register(sub: argparse._SubParsersAction) -> None:
    p = add_common(sub.add_parser(
        "circuit", help="circuit graph from verified nodes (path-patching edges), faithfulness, export"))
    p.add_argument("model", help="probed model checkpoint directory")
    p.add_argument("--verified", help="JSON written by 'circuitkit verify --out'; without it the whole chain "
                                      "(hypothesize -> verify) runs first on --sites/--positions")
    p.add_argument("--sites", help="(without --verified) sites, e.g. a0.0,a0.1,m0 (default: every head and MLP)")
    p.add_argument("--positions", help="(without --verified) positions for sites given without one")
    p.add_argument("--queries", type=int, default=60)
    p.add_argument("--pool", type=int, default=20000)
    p.add_argument("--task")
    p.add_argument("--out", required=True, help="output directory: circuit.json/.graphml/.dot/.svg/.png")
    p.add_argument("--inputs", type=int, default=3000, help="task inputs for path patching")
    p.add_argument("--eval-inputs", type=int, default=1000, help="inputs for faithfulness/completeness/minimality")
    p.add_argument("--min-edge", type=float, default=0.1, help="edge kept when the path effect's CI low >= this")
    p.add_argument("--target", type=float, default=0.9,
                   help="grow the circuit until normalised faithfulness (logit difference) reaches this (default 0.9)")
    p.add_argument("--edge-pairs", type=int, default=150, help="pairs per path-patching edge test")
    p.add_argument("--no-picture", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(handler=_circuit)


def _circuit(args: argparse.Namespace) -> Output:
    import torch

    from circuitkit.circuit.discover import CircuitSettings, assemble_circuit, discover_circuit, make_circuit
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.tasks.registry import check_same_task, task_record
    from circuitkit.verification.interchange import InterchangeVerifier, VerifyThresholds
    from circuitkit.verification.report import VerificationReport, VerifiedNode

    check_threads(args.threads)
    torch.set_num_threads(args.threads)
    check_range("--target", args.target, 0, 1, lo_open=True, hint=" (a normalised faithfulness)")
    check_range("--min-edge", args.min_edge, 0, 1, hint=" (the CI low of a path effect, a difference of rates)")
    check_range("--inputs", args.inputs, 10, MAX_INPUTS)
    check_range("--eval-inputs", args.eval_inputs, 10, MAX_INPUTS)
    check_range("--edge-pairs", args.edge_pairs, 1, MAX_PAIRS)
    check_range("--queries", args.queries, 1, 10_000)
    check_range("--pool", args.pool, 1, 1_000_000)
    check_out_dir(args.out)
    d = None
    if args.verified:
        d = read_artifact(args.verified, "verification report", "circuitkit verify MODEL --out FILE")
    pm = load_probed(args.model, task=args.task, artefact=(d, str(args.verified)) if d is not None else None)
    settings = CircuitSettings(target=args.target, min_edge=args.min_edge, edge_pairs=args.edge_pairs,
                               eval_inputs=args.eval_inputs)
    extra: dict = {}
    if d is not None:
        check_same_task(d, pm.task, str(args.verified))
        try:
            nodes = [VerifiedNode.from_dict(n) for n in d["nodes"]]
            extra["controls_summary"] = d.get("controls_summary")
        except (KeyError, TypeError, ValueError) as e:
            raise CircuitkitError(f"{str(args.verified)!r} is not a verification report ({e})") from None
        ver = InterchangeVerifier(pm, n_inputs=args.inputs, seed=args.seed)
        vr = VerificationReport(pm.task.name, str(args.model), VerifyThresholds(), nodes, [], [],
                                task_ref=task_record(pm.task))
        circuit = make_circuit(assemble_circuit(pm, ver, vr, settings, args.seed), extra)
    else:
        from circuitkit.sites import expand_sites

        sites = expand_sites(args.sites, args.positions, pm)
        disc = discover_circuit(pm, sites, n_queries=args.queries, pool=args.pool, n_inputs=args.inputs,
                                eval_inputs=args.eval_inputs, seed=args.seed, model_name=str(args.model),
                                settings=settings)
        circuit = disc.circuit()
    files = circuit.save(args.out, picture=not args.no_picture)
    data = {**circuit.to_dict(), "files": files}
    g, ev, growth, curve = circuit.graph, circuit.evaluation, circuit.growth, circuit.curve
    edge_eval, share = circuit.edge_evaluation, circuit.explained_share
    n_sites = sum(1 for _, dd in g.nodes(data=True) if dd["kind"] == "site")
    lines = [f"circuit: {n_sites} nodes ({len(growth.added)} added by growth, unexplained), "
             f"{g.number_of_edges()} edges -> {args.out}"]
    for a, b, dd in g.edges(data=True):
        lines.append(f"  {a} -> {b}  [{dd['feature']}] effect {float(dd['effect']):.2f} (CI low {float(dd['ci_low']):.2f})")
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    lines.append("faithfulness, normalised logit difference (C − ∅) / (M − ∅) [95% CI]: " +
                 ", ".join(f"{k} undefined (m(M) <= m(∅): left out of all)" if v != v else
                           f"{k} {fmt(v)} [{fmt(ev.faithfulness_normalized_ci[k][0])}, "
                           f"{fmt(ev.faithfulness_normalized_ci[k][1])}]" for k, v in ev.faithfulness_normalized.items()))
    ef = (edge_eval or {}).get("faithfulness_normalized", {})
    lines.append("edge-level faithfulness (nodes talk only along the edges): " +
                 ", ".join(f"{k} {fmt(v)}" for k, v in ef.items()))
    lines.append("completeness (1 − max incompleteness, Wang et al.): " +
                 ", ".join(f"{k} {fmt(v)}" for k, v in ev.completeness.items()))
    lines.append(f"minimal: {ev.minimal}; CPR {fmt(curve.cpr)}, CMD {fmt(curve.cmd)}; share explained by verified "
                 f"features: {fmt(share)}")
    return Output(data, "\n".join(lines))
