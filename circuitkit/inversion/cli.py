"""``circuitkit decoder train|eval`` and ``circuitkit invert``."""
from __future__ import annotations

import argparse
from pathlib import Path

from circuitkit.cli import Output, add_common


def register(sub: argparse._SubParsersAction) -> None:
    dec = sub.add_parser("decoder", help="train and evaluate InversionView decoders")
    dsub = dec.add_subparsers(dest="decoder_command", metavar="ACTION")
    dec.set_defaults(handler=None)

    tr = add_common(dsub.add_parser("train", help="train one decoder for all paper sites of a probed model"))
    tr.add_argument("model", help="probed model checkpoint directory")
    tr.add_argument("--task", help="task (default: read from the checkpoint's circuitkit.json)")
    tr.add_argument("--out", required=True, help="decoder output directory (must not exist or be empty)")
    tr.add_argument("--steps", type=int, help="optimisation steps (default 20000)")
    tr.add_argument("--minutes", type=float, help="training-time budget in minutes (stops at steps or minutes)")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--d-model", type=int, help="decoder width (paper: 256)")
    tr.add_argument("--layers", type=int, dest="n_layers")
    tr.add_argument("--heads", type=int, dest="n_heads")
    tr.add_argument("--slots", type=int, dest="n_slots", help="activation slots per decoder layer (paper: 1)")
    tr.add_argument("--mixed-sites", action="store_true",
                    help="draw a site per training input rather than per batch (paper: per batch)")
    tr.add_argument("--compile", action="store_true",
                    help="torch.compile the training step (needs a C++ compiler; saved nothing on 2 CPU cores)")
    tr.add_argument("--length-groups", type=int,
                    help="train rows of similar length together, each group trimmed to its longest row "
                         "(default 2; 1: the whole batch at once); the gradients are the same")
    tr.add_argument("--sites", help="comma-separated sites (default: the paper's sites for this model)")
    tr.add_argument("--eval-every", type=int, help="steps between hit-rate estimates (rebalancing)")
    tr.add_argument("--final-eval-queries", type=int, help="held-out queries per site at the end (0 = skip)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--threads", type=int, help="torch CPU threads")
    tr.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(handler=_train)

    ev = add_common(dsub.add_parser("eval", help="per-site hit rate and in-ε fraction on held-out queries"))
    ev.add_argument("decoder_dir")
    ev.add_argument("--model", help="probed model (default: the one recorded in the decoder)")
    ev.add_argument("--queries", type=int, default=200, help="held-out queries per site (default 200)")
    ev.add_argument("--per-cell", type=int, default=256,
                    help="samples per (temperature, noise) cell; 4 cells (default 256 -> 1024 per query, the paper's); "
                         "a query stops at its first sample within ε")
    ev.add_argument("--sites", help="comma-separated subset of the decoder's sites")
    ev.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    ev.add_argument("--eps", type=float)
    ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ev.add_argument("--threads", type=int)
    ev.set_defaults(handler=_eval)

    iv = add_common(sub.add_parser("invert", help="sample the ε-preimage of one activation and show it coloured"))
    iv.add_argument("decoder_dir")
    iv.add_argument("--site", required=True, help="site with position, e.g. a1.0@: or x0.post@A1")
    iv.add_argument("--input", required=True, help="the input text whose activation is inverted")
    iv.add_argument("--model", help="probed model (default: the one recorded in the decoder)")
    iv.add_argument("--per-cell", type=int, default=256, help="samples per (temperature, noise) cell (paper: 256)")
    iv.add_argument("--show", type=int, default=100, help="samples to display, closest first (default 100)")
    iv.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    iv.add_argument("--eps", type=float)
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--html", help="also write a standalone HTML page here")
    iv.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    iv.add_argument("--threads", type=int)
    iv.set_defaults(handler=_invert)


def _positive(name: str, v) -> None:
    from circuitkit.validate import check_positive

    check_positive(f"--{name}", v)


def _check_sampling(args: argparse.Namespace) -> None:
    """Ranges of the sampling options ``decoder eval`` and ``invert`` share."""
    from circuitkit.inversion.preimage import MAX_PER_CELL
    from circuitkit.validate import check_range, check_threads

    check_range("--per-cell", args.per_cell, 1, MAX_PER_CELL)
    check_range("--eps", args.eps, 0, lo_open=True, hint=" (a relative distance; the paper's 0.1)")
    check_threads(args.threads)


def _parse_sites(text: str | None):
    from circuitkit.sites import parse_site

    if not text:
        return None
    return [parse_site(s).at(None) for s in text.split(",") if s.strip()]


def _train(args: argparse.Namespace) -> Output:
    from circuitkit.inversion.train import DecoderTrainConfig, train_decoder
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.sites import check_site
    from circuitkit.validate import check_out_dir, check_range

    for n in ("steps", "minutes", "batch_size", "lr", "d_model", "n_layers", "n_heads", "n_slots", "eval_every",
              "threads", "length_groups"):
        _positive(n.replace("_", "-"), getattr(args, n))
    check_range("--final-eval-queries", args.final_eval_queries, 0)
    check_out_dir(args.out)
    cfg = DecoderTrainConfig().replace(
        steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, n_slots=args.n_slots, mixed_sites=args.mixed_sites or None,
        eval_every=args.eval_every, seed=args.seed, compile=args.compile or None,
        threads=args.threads, final_eval_queries=args.final_eval_queries, length_groups=args.length_groups,
    )
    if args.d_model is not None:
        cfg = cfg.replace(cond_mid=2 * args.d_model)
    pm = load_probed(args.model, task=args.task, device=args.device)
    sites = _parse_sites(args.sites)
    for s in sites or []:
        check_site(s, pm.n_layers, pm.n_heads)
    m = train_decoder(pm, args.out, cfg, sites=sites, progress=not args.quiet, device=args.device)
    lines = [f"trained decoder -> {args.out} ({m['steps']} steps, {m['train_minutes']:.1f} min)"]
    if "eval" in m:
        lines += [f"  {r['site']:<10} hit rate {r['hit_rate']:.3f}  in-ε {r['in_eps_fraction']:.3f}"
                  for r in m["eval"]["sites"]]
    return Output({"out": args.out, **m}, "\n".join(lines))


def _eval(args: argparse.Namespace) -> Output:
    import torch

    from circuitkit.inversion.checkpoint import load_checked_decoder
    from circuitkit.inversion.evaluate import evaluate_site
    from circuitkit.validate import check_range

    check_range("--queries", args.queries, 1, 100_000)
    _check_sampling(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    td = load_checked_decoder(args.decoder_dir, args.model, args.device)
    sites = _parse_sites(args.sites) or td.sites
    rows = [evaluate_site(td.decoder, td.probed, s, td.site_index(s), n_queries=args.queries,
                          n_per_cell=args.per_cell, metric=args.metric, eps=args.eps) for s in sites]
    data = {"decoder": args.decoder_dir, "metric": args.metric, "sites": rows,
            "min_hit_rate": min(r["hit_rate"] for r in rows)}
    text = "\n".join(f"{r['site']:<10} hit rate {r['hit_rate']:.3f}  in-ε fraction {r['in_eps_fraction']:.3f}  "
                     f"({r['n_queries']} queries × {r['samples_per_query']} samples)" for r in rows)
    return Output(data, text)


def _invert(args: argparse.Namespace) -> Output:
    import torch

    from circuitkit.inversion.checkpoint import load_checked_decoder
    from circuitkit.inversion.colour import token_colours
    from circuitkit.inversion.preimage import invert_text
    from circuitkit.inversion.render import render_ansi, render_html
    from circuitkit.io_utils import atomic_write_text
    from circuitkit.sites import parse_site
    from circuitkit.validate import check_out_file

    _check_sampling(args)
    _positive("show", args.show)
    check_out_file(args.html, "--html")
    site = parse_site(args.site)
    if args.threads:
        torch.set_num_threads(args.threads)
    td = load_checked_decoder(args.decoder_dir, args.model, args.device)
    td.probed.task.check_input(args.input, "--input")
    inv = invert_text(td, site, args.input, n_per_cell=args.per_cell, metric=args.metric, eps=args.eps,
                      seed=args.seed)
    rows = inv.display(args.show)
    shown = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    colours = torch.zeros(inv.ids.shape, dtype=torch.float)
    colours[shown] = token_colours(td, site, inv.ids[shown], inv.query)
    tok, pad = td.probed.task.tokenizer, td.probed.task.vocab.pad
    for r in rows:
        r["colours"] = [round(c, 4) for c in colours[r["index"]].tolist()]
    if args.html:
        atomic_write_text(Path(args.html), render_html(inv, rows, colours, tok, pad))
    data = {"site": str(site), "input": args.input, "metric": inv.metric, "eps": inv.eps,
            "n_samples": len(inv.texts), "in_eps_fraction": float(inv.in_eps.float().mean()), "hit": inv.hit,
            "samples": rows, "html": args.html}
    return Output(data, render_ansi(inv, rows, colours, tok, pad)
                  + f"\n{int(inv.in_eps.sum())} of {len(inv.texts)} samples within ε"
                  + (f"; HTML written to {args.html}" if args.html else ""))
