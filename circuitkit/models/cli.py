"""``circuitkit model train|eval|from-tracr`` and ``circuitkit sites``."""
from __future__ import annotations

import argparse

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError
from circuitkit.tasks import get_task, task_names


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="train and evaluate probed models")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION")

    tr = add_common(msub.add_parser("train", help="train a probed model on a task (CPU-friendly)"))
    tr.add_argument("task", help=f"task: {', '.join(task_names())}, path/to/file.py:Class or package.module:Class")
    tr.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    tr.add_argument("--steps", type=int, help="optimisation steps (default: the task's model_recipe)")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--arch", metavar="{gpt2,gpt_neox,llama}",
                    help="block family (default gpt2): gpt_neox = parallel residual and rotary positions; llama = "
                         "RMSNorm, rotary, gated SiLU MLP and grouped-query attention (--kv-heads)")
    tr.add_argument("--kv-heads", type=int, dest="n_kv_head", help="llama: key/value heads (default --heads)")
    tr.add_argument("--layers", type=int, dest="n_layer")
    tr.add_argument("--heads", type=int, dest="n_head")
    tr.add_argument("--d-model", type=int, dest="d_model")
    tr.add_argument("--init-std", type=float, dest="init_std", help="std of the initial weights (default: per task; 0.1 for ioi, GPT-2's 0.02 otherwise)")
    tr.add_argument("--attn-init", dest="attn_init", metavar="{normal,mimetic}",
                    help="attention initialisation (default: per task; mimetic for counting, normal otherwise)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--eval-limit", type=int, help="held-out examples to evaluate at the end (default 20000)")
    tr.add_argument("--threads", type=int, help="torch CPU threads")
    tr.add_argument("--init-from", help="start from this checkpoint's weights (same architecture; fresh schedule)")
    tr.add_argument("--device", default="cpu", help="cpu or cuda")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(handler=_train)

    ev = add_common(msub.add_parser("eval", help="held-out accuracy of a checkpoint"))
    ev.add_argument("model_dir", help="checkpoint directory")
    ev.add_argument("--task", help="task (default: read from the checkpoint's circuitkit.json)")
    ev.add_argument("--split", default="test", choices=["train", "test"])
    ev.add_argument("--limit", type=int, default=20000, help="evaluate a seeded random subset (0 = all)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(handler=_eval)
    ft = add_common(msub.add_parser("from-tracr", help="compile a RASP program with tracr into a native model "
                                                       "with its ground truth (needs circuitkit[tracr])"))
    ft.add_argument("program", help="FILE.py:NAME (or package.module:NAME): NAME() returns {'program': SOp, "
                                    "'vocab': set, 'max_seq_len': int[, 'compiler_bos': str, 'causal': bool]}")
    ft.add_argument("--out", required=True, help="model directory to write (must not exist or be empty)")
    ft.set_defaults(handler=_from_tracr)
    model.set_defaults(handler=None)

    st = add_common(sub.add_parser("sites", help="list every activation site of a model"))
    st.add_argument("model_dir")
    st.add_argument("--task", help="task whose named positions to list (default: the checkpoint's, if it records one); "
                                          "the sites themselves depend on the architecture only")
    st.add_argument("--kinds", help="comma-separated site kinds (default: all)")
    st.set_defaults(handler=_sites)


def _train(args: argparse.Namespace) -> Output:
    from circuitkit.models.train import default_config, train_probed
    from circuitkit.validate import check_device, check_out_dir, check_range, check_threads

    task = get_task(args.task)
    check_out_dir(args.out)
    check_device(args.device)
    check_threads(args.threads)
    check_range("--eval-limit", args.eval_limit, 1)
    cfg = default_config(task).replace(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_layer=args.n_layer, n_head=args.n_head,
        d_model=args.d_model, seed=args.seed, eval_limit=args.eval_limit, threads=args.threads,
        init_from=args.init_from, init_std=args.init_std, attn_init=args.attn_init, arch=args.arch,
        n_kv_head=args.n_kv_head,
    )
    for name in ("steps", "batch_size", "n_layer", "n_head", "d_model", "lr", "init_std"):
        if getattr(cfg, name) <= 0:
            raise CircuitkitError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    m = train_probed(task, args.out, cfg, progress=not args.quiet, device=args.device)
    text = (f"trained {task.name} model -> {args.out}\n"
            f"held-out {m['metric']}: {m['accuracy']:.4f} (95% CI {m['accuracy_ci95'][0]:.4f}-"
            f"{m['accuracy_ci95'][1]:.4f}, n={m['n']}); training took {m['train_wall_seconds']:.0f} s")
    return Output({"out": args.out, **m}, text)


def _eval(args: argparse.Namespace) -> Output:
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.models.evaluate import evaluate_model

    if args.limit is not None and args.limit < 0:
        raise CircuitkitError(f"--limit must be >= 0, got {args.limit}")
    pm = load_probed(args.model_dir, task=args.task, device=args.device)
    m = evaluate_model(pm.runner, pm.task, args.split, limit=args.limit or None, progress=not args.quiet)
    lines = [f"{pm.task.name} {args.split} ({m['n']} of {m['split_size']}): {m['metric']} = {m['accuracy']:.4f} "
             f"(95% CI {m['accuracy_ci95'][0]:.4f}-{m['accuracy_ci95'][1]:.4f})"]
    if "prefers_answer" in m:
        lines.append(f"prefers answer over competitor: {m['prefers_answer']:.4f}; "
                     f"mean logit difference {m['mean_logit_diff']:.3f}")
    return Output({"model": args.model_dir, "task": pm.task.name, **m}, "\n".join(lines))


def _from_tracr(args: argparse.Namespace) -> Output:
    from circuitkit.models.from_tracr import from_tracr
    from circuitkit.validate import check_out_dir

    check_out_dir(args.out)
    r = from_tracr(args.program, args.out, log=(lambda m: None) if args.json else print)
    return Output(r, f"{args.out}: matches tracr on {r['check']['inputs_checked']} inputs "
                     f"({'all' if r['check']['exhaustive'] else 'a sample'}); ground truth: {r['components']} "
                     f"components, {r['edges']} edges (ground_truth.json)")


def _sites(args: argparse.Namespace) -> Output:
    from circuitkit.models.checkpoint import read_architecture, read_meta
    from circuitkit.sites import all_sites
    from circuitkit.tasks.registry import task_from_record

    n_layers, n_heads = read_architecture(args.model_dir)
    kinds = args.kinds.split(",") if args.kinds else None
    sites = all_sites(n_layers, n_heads, kinds)
    rows = [{"site": s.node, "hook": s.hook_str(), "kind": s.kind, "layer": s.layer, "head": s.head} for s in sites]
    text = "\n".join(f"{r['site']:<14} {r['hook']}" for r in rows)
    out = {"sites": rows}
    meta = read_meta(args.model_dir)
    if args.task or meta.get("task"):
        task = get_task(args.task) if args.task else task_from_record(meta.get("task_ref"), meta["task"], args.model_dir)
        text += f"\npositions ({task.name}): {', '.join(task.position_names)} or an index 0..{task.seq_len - 1}"
        out.update(positions=list(task.position_names), seq_len=task.seq_len)
    return Output(out, text)
