"""Wall time of each circuit-discovery method (``circuitkit discover``) on the committed case-study models.

    .venv/bin/python benchmarks/discovery_methods.py            # counting, addition, ioi; 100 pairs; min of 3

Every method scores the same 100 aligned pairs in one process, one after another, each timed ``--repeats`` times
(the minimum is the figure; the median beside it).  Targets (issue 32): EAP-IG on the ioi model under 10 s on 2
cores, and exact scoring of every edge within 10x EAP-IG's time.  The load average is recorded before and after:
no idle-machine time is stated when another job shared the cores.  Writes results/discovery_methods.json.

    .venv/bin/python benchmarks/discovery_methods.py --shape gpt2-small [--layers 4] [--n 16] [--reference sample]
    .venv/bin/python benchmarks/discovery_methods.py --shape gpt2-small [--layers 4] --transformer-lens

The first times exact scoring of every edge at GPT-2 small's shape (random weights, word-level IOI;
``patching_sweep.py``'s model), receiver block by receiver block, beside the same scoring with every forward run
from the embeddings, in one process, with the largest difference between the two scores: over every edge, or
(``--reference sample``) over the first chunk of edges into each block.  It writes
results/discovery_exact_gpt2-small[_NL].json, rewritten after each block until the last.  The second scores those
sampled edges with circuitkit and with TransformerLens's own hooks (one ``run_with_hooks`` per edge), side by side
in one process, and adds the comparison to the same JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from patching_sweep import shaped_model

from circuitkit.discovery.masked import circuit_metric
from circuitkit.discovery.methods import METHODS, discover
from circuitkit.discovery.problem import aligned_pairs, build_problem
from circuitkit.io_utils import atomic_write_json
from circuitkit.machine_load import LoadWatch
from circuitkit.manifest import git_commit
from circuitkit.models.checkpoint import load_probed
from circuitkit.patching.metrics import evaluate

HERE = Path(__file__).resolve().parent
SETTINGS = {"eap-ig-inputs": {"steps": 5}, "eap-ig-activations": {"steps": 5}, "acdc": {"tau": 0.01}}


def _by_block(g) -> dict[str, list[tuple[int, int]]]:
    """Every edge, grouped by its receiver's block ("block L" or "logits"), in the order the blocks run."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, j in sorted(g.real.nonzero().tolist(), key=lambda e: (e[1], e[0])):
        r = g.receivers[j]
        groups.setdefault("logits" if r.kind == "logits" else f"block {r.layer}", []).append((i, j))
    return groups


def _mask_of(g, edges: list[tuple[int, int]]) -> torch.Tensor:
    """[n_senders, n_receivers] bool, True on ``edges``."""
    mask = torch.zeros(g.shape, dtype=torch.bool)
    for i, j in edges:
        mask[i, j] = True
    return mask


def _tl_sender_output(cache, s) -> torch.Tensor:
    """A sender's output from a TransformerLens cache: [b, pos, d_model]."""
    if s.layer < 0:
        return cache["blocks.0.hook_resid_pre"]
    if s.site.head is not None:
        return cache[f"blocks.{s.layer}.attn.hook_result"][:, :, s.site.head]
    return cache[f"blocks.{s.layer}.hook_mlp_out"]


@torch.no_grad()
def tl_exact_scores(pm, p, source_ids: torch.Tensor, edges: list[tuple[int, int]]) -> torch.Tensor:
    """The reference: each edge ablated alone with TransformerLens's own hooks on its bridge, one
    ``run_with_hooks`` per edge, the way a TransformerLens user would write it.  The receiver's input (split
    q / k / v input, ``hook_mlp_in``, or the stream entering the unembedding) loses the sender's clean output and
    gains its output on the source.  Returns the scores [n_senders, n_receivers] (0 off ``edges``)."""
    g = p.graph
    bridge = pm.bridge()
    bridge.set_use_attn_result(True)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)
    wanted = {"blocks.0.hook_resid_pre"} | {f"blocks.{L}.{h}" for L in range(g.n_layers)
                                             for h in ("attn.hook_result", "hook_mlp_out")}
    _, base_cache = bridge.run_with_cache(p.base, names_filter=lambda n: n in wanted)
    _, src_cache = bridge.run_with_cache(source_ids, names_filter=lambda n: n in wanted)

    def metric(logits: torch.Tensor) -> float:
        return float(evaluate(p.metric, logits, p.ctx)[0].mean())

    full = metric(bridge(p.base))
    scores = torch.zeros(g.shape)
    for i, j in edges:
        s, r = g.senders[i], g.receivers[j]
        delta = _tl_sender_output(base_cache, s) - _tl_sender_output(src_cache, s)  # [b, pos, d]
        if r.kind == "head":
            hook = f"blocks.{r.layer}.hook_{r.qkv}_input"  # [b, pos, head, d]

            def fn(act, hook=None, h=r.head, delta=delta):
                act = act.clone()
                act[:, :, h] -= delta
                return act
        else:
            hook = (f"blocks.{r.layer}.hook_mlp_in" if r.kind == "mlp"
                    else f"blocks.{g.n_layers - 1}.hook_resid_post")

            def fn(act, hook=None, delta=delta):
                return act - delta
        scores[i, j] = full - metric(bridge.run_with_hooks(p.base, fwd_hooks=[(hook, fn)]))
    return scores


def compare_with_transformer_lens(shape: str, layers: int | None, n: int, threads: int, out: str | None) -> int:
    """The first chunk of edges into each block (and the logits), scored in one process by circuitkit (each
    forward from the receiver's block) and by ``tl_exact_scores``; adds ``compared_with_transformer_lens`` to the
    shape's JSON (created if absent)."""
    torch.set_num_threads(threads)
    pm, desc = shaped_model(None, "cpu", shape, layers)
    p, record = build_problem(pm, n, seed=0)
    _, sources = aligned_pairs(pm, n, 0)  # the problem's own sources (same seed)
    source_ids = pm.task.encode(sources).to(p.base.device)
    g, chunk = p.graph, 16
    edges = [e for group in _by_block(g).values() for e in group[:chunk]]
    circuit_metric(p.runner, g, p.base, p.ablated, g.full(), p.ctx)  # warm-up, untimed
    load = LoadWatch(threads)
    p.forget_clean()  # circuitkit's timed run includes its own clean forward
    ours = discover(p, "exact", edges=edges, chunk=chunk, progress=False)
    t0 = time.perf_counter()
    ref = tl_exact_scores(pm, p, source_ids, edges)
    tl_seconds = time.perf_counter() - t0
    load.stop()
    mask = _mask_of(g, edges)
    diff = float((ours.scores - ref)[mask].abs().max())
    suffix = f"_{layers}L" if layers else ""
    path = Path(out or HERE / "results" / f"discovery_exact_{shape}{suffix}.json")
    result = json.loads(path.read_text()) if path.exists() else {"model": desc, "edges": g.n_edges}
    result["compared_with_transformer_lens"] = {
        "edges": len(edges), "which": f"the first {chunk} edges (by receiver, then sender) into each block and the "
        "logits", "n_pairs": record["n"],
        "transformer_lens": "one run_with_hooks per edge on the TransformerBridge (split q/k/v input, hook_mlp_in, "
        "the last block's hook_resid_post)",
        "circuitkit_seconds": round(ours.seconds, 2), "transformer_lens_seconds": round(tl_seconds, 2),
        "speedup": round(tl_seconds / ours.seconds, 2), "max_abs_score_difference": diff,
        "equal_within_1e-4": diff <= 1e-4, "largest_score": float(ref[mask].abs().max()), "threads": threads,
        **load.record("timing"), "git_commit": git_commit()}
    atomic_write_json(str(path), result)
    print(f"transformer_lens {tl_seconds:.1f} s, circuitkit {ours.seconds:.1f} s, largest difference {diff:.2e}",
          file=sys.stderr)
    print(path)
    return 0


def exact_at_shape(shape: str, layers: int | None, n: int, threads: int, out: str | None, reference: str) -> int:
    """Exact scoring of every edge from each receiver's block on, beside the same from the embeddings: over every
    edge (``reference`` "all"), or over the first chunk of edges into each block ("sample", for depths where the
    reference over every edge would take hours).  Receiver blocks are scored one after another and the JSON is
    rewritten after each, marked incomplete until the last."""
    torch.set_num_threads(threads)
    pm, desc = shaped_model(None, "cpu", shape, layers)
    p, record = build_problem(pm, n, seed=0)
    g, chunk = p.graph, 16
    circuit_metric(p.runner, g, p.base, p.ablated, g.full(), p.ctx)  # warm-up, untimed
    groups = _by_block(g)
    suffix = f"_{layers}L" if layers else ""
    path = out or str(HERE / "results" / f"discovery_exact_{shape}{suffix}.json")
    load = LoadWatch(threads)
    p.forget_clean()  # the base's clean run is inside the timing
    scores, seconds, per_block = torch.zeros(g.shape), 0.0, {}
    base = {"model": desc, "edges": g.n_edges, "n_pairs": record["n"], "chunk": chunk, "threads": threads}
    for name, edges in groups.items():
        res = discover(p, "exact", from_receiver=True, edges=edges, chunk=chunk, progress=False)
        scores += res.scores
        seconds += res.seconds
        per_block[name] = {"edges": len(edges), "seconds": round(res.seconds, 2)}
        done = sum(b["edges"] for b in per_block.values())
        print(f"exact from the receiver, {name:9s} {len(edges):6d} edges {res.seconds:8.1f} s "
              f"({done}/{g.n_edges} edges, {seconds:.0f} s)", file=sys.stderr, flush=True)
        if done < g.n_edges:
            atomic_write_json(path, {**base, "complete": False, "edges_scored": done,
                                     "seconds_so_far": round(seconds, 2), "per_block": per_block,
                                     "git_commit": git_commit()})
    if reference == "all":
        checked = None
    else:  # the first chunk of edges into each block
        checked = [e for edges in groups.values() for e in edges[:chunk]]
    runs = {}
    for name, from_receiver in (("from_receiver", True), ("from_embeddings", False)):
        if reference == "all" and from_receiver:
            continue  # the full run above is this run
        p.forget_clean()
        runs[name] = discover(p, "exact", from_receiver=from_receiver, edges=checked, chunk=chunk, progress=False)
        print(f"reference ({reference}), {name:16s} {runs[name].seconds:9.1f} s", file=sys.stderr, flush=True)
    load.stop()
    ref = runs["from_embeddings"]
    mask = g.real.clone() if checked is None else _mask_of(g, checked)
    compared = {"edges": int(mask.sum()),
                "from_embeddings_seconds": round(ref.seconds, 2),
                "from_receiver_seconds": round(runs["from_receiver"].seconds if "from_receiver" in runs
                                               else seconds, 2),
                "max_abs_score_difference": float((scores - ref.scores)[mask].abs().max()),
                "largest_score": float(ref.scores[mask].abs().max())}
    compared["speedup"] = round(compared["from_embeddings_seconds"] / compared["from_receiver_seconds"], 2)
    result = {**base, "complete": True, "reference": reference,
              "seconds": {"from_receiver": round(seconds, 2)}, "per_block": per_block,
              "compared_with_from_embeddings": compared,
              "largest_score": float(scores.abs().max()), **load.record("timing"), "git_commit": git_commit()}
    atomic_write_json(path, result)
    print(path)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="counting,addition,ioi")
    ap.add_argument("--n", type=int, help="aligned pairs (default 100; with --shape 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", choices=["gpt2-small"], help="exact scoring at this shape instead of the cases")
    ap.add_argument("--layers", type=int, help="with --shape: fewer layers than 12")
    ap.add_argument("--reference", choices=["all", "sample"], default="all",
                    help="with --shape: score every edge from the embeddings too (all), or the first chunk of "
                         "edges into each block (sample; the full 12 layers would take hours)")
    ap.add_argument("--transformer-lens", action="store_true",
                    help="with --shape: only score the sampled edges beside TransformerLens (added to the JSON)")
    ap.add_argument("--out", help="default results/discovery_methods.json")
    args = ap.parse_args()
    if args.layers is not None and not (args.shape and 1 <= args.layers <= 12):
        ap.error(f"--layers {args.layers}: only with --shape gpt2-small, from 1 to 12")
    if args.transformer_lens and not args.shape:
        ap.error("--transformer-lens goes with --shape gpt2-small")
    if args.shape and args.transformer_lens:
        return compare_with_transformer_lens(args.shape, args.layers, args.n or 16, args.threads, args.out)
    if args.shape:
        return exact_at_shape(args.shape, args.layers, args.n or 16, args.threads, args.out, args.reference)
    args.n = args.n or 100
    args.out = args.out or str(HERE / "results" / "discovery_methods.json")
    torch.set_num_threads(args.threads)
    load = LoadWatch(args.threads)
    cases = {}
    for case in args.cases.split(","):
        pm = load_probed(HERE.parent / "case_studies" / "models" / case)
        p, _ = build_problem(pm, args.n, seed=0)
        times: dict[str, dict[str, float]] = {}
        for method in METHODS:
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                discover(p, method, **SETTINGS.get(method, {}))
                runs.append(time.perf_counter() - t0)
            times[method] = {"min_s": round(min(runs), 4), "median_s": round(statistics.median(runs), 4)}
            print(f"{case:9s} {method:19s} {times[method]['min_s']:8.3f} s", file=sys.stderr)
        ig = times["eap-ig-inputs"]["min_s"]
        cases[case] = {"edges": p.graph.n_edges, "n_pairs": int(p.base.shape[0]), "seconds": times,
                       "exact_over_eap_ig_inputs": round(times["exact"]["min_s"] / ig, 2),
                       "exact_over_eap_ig_activations": round(times["exact"]["min_s"] / times["eap-ig-activations"]["min_s"], 2)}
    load.stop()
    ioi = cases.get("ioi")
    out = {"cases": cases, "settings": SETTINGS, "threads": args.threads, "repeats": args.repeats,
           "targets": {"eap_ig_ioi_under_s": 10, "exact_within_x_eap_ig": 10},
           "meets": None if ioi is None or load.shared else {
               "eap_ig_ioi_under_10s": max(ioi["seconds"]["eap-ig-inputs"]["min_s"],
                                           ioi["seconds"]["eap-ig-activations"]["min_s"]) < 10,
               "exact_within_10x_eap_ig_inputs": ioi["exact_over_eap_ig_inputs"] <= 10},
           **load.record("timing"), "git_commit": git_commit()}
    atomic_write_json(args.out, out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
