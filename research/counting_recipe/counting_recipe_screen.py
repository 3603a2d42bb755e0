"""Short counting training runs that show *which mechanism* a recipe is heading for.

The paper's counting model computes the count at the query letter (a0.0 there attends to the same
letter) and a1.0 copies it to ``:``; with GPT-2's normal init our recipe instead computed it at ``:`` and
saturated near 91% (the mimetic attention init, now the default, reaches the paper's mechanism). This screen trains the paper architecture with a recipe (the defaults of
``circuitkit model train counting`` plus overrides) for a few thousand steps and records, every
``--every`` steps, the loss, held-out accuracy and the share of a0.0's attention at the query letter
that lands on occurrences of that letter (about 0.3 for a uniform head). ``--model DIR`` measures a
trained checkpoint instead.

``--set init_from=DIR`` continues a trained checkpoint (the paper's counting run sat on a loss
plateau at ~0.22 for ~25 epochs before its mechanism formed); ``--device cuda`` trains on a GPU
from a pre-encoded copy of the training split; ``--minutes`` stops early; ``--save DIR`` writes
the final model as a circuitkit checkpoint (metrics, history, manifest).

    .venv/bin/python research/counting_recipe/counting_recipe_screen.py --set seed=1 --steps 8000 --threads 1
    .venv/bin/python research/counting_recipe/counting_recipe_screen.py --model case_studies/models/counting
    python research/counting_recipe/counting_recipe_screen.py --device cuda --set init_from=case_studies/models/counting \
        --set lr=1e-3 --set warmup=0 --set min_lr_ratio=1 --steps 1000000 --minutes 6 --save runs/counting_cont

Writes results/counting_screen_<label>.json (or --results PATH).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from counting_graph_train import encode_all  # sibling script (this folder is on sys.path when run)

from circuitkit.models.checkpoint import load_probed
from circuitkit.models.evaluate import evaluate_model
from circuitkit.models.runner import ModelRunner
from circuitkit.models.train import (
    TrainConfig,
    UniformSampler,
    build_model,
    default_config,
    make_optimizer,
    train_step,
    trim_padding,
    write_trained,
)
from circuitkit.tasks import get_task
from circuitkit.tasks.base import Task

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def mechanism_probe(model: torch.nn.Module, task: Task, texts: list[str]) -> dict[str, float]:
    """Accuracy at ``:`` and a0.0's attention at the query letter: share on the same letter, share on BOS."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")  # sdpa does not return attention patterns
    ids = task.encode(texts).to(next(model.parameters()).device)  # [batch, pos]
    out = model(input_ids=ids, output_attentions=True)
    colon = task.vocab.id_of(":")
    correct, same, bos = 0, 0.0, 0.0
    for b in range(len(texts)):
        row = ids[b]
        c = int((row == colon).nonzero()[0])
        q = c - 1  # the query letter
        correct += int(out.logits[b, c].argmax()) == int(row[c + 1])
        att = out.attentions[0][b, 0, q]  # [pos] layer 0, head 0, from the query letter
        same += float(att[: q + 1][row[: q + 1] == row[q]].sum())
        bos += float(att[0])
    n = len(texts)
    return {"accuracy": correct / n, "a0_query_same_letter_share": same / n, "a0_query_bos_share": bos / n}


def parse_overrides(items: list[str]) -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if not raw:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TrainConfig field of the counting defaults (repeatable)")
    ap.add_argument("--steps", type=int, default=8000, help="steps to run (the lr schedule keeps the recipe's length)")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--model", help="probe this trained checkpoint instead of training")
    ap.add_argument("--label", help="results file label (default: from the overrides)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--minutes", type=float, help="stop after this much training time (probes at the end)")
    ap.add_argument("--save", metavar="DIR", help="write the final model here as a circuitkit checkpoint")
    ap.add_argument("--results", metavar="PATH", help="results JSON path (default: results/counting_screen_<label>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("counting")
    test = list(task.split("test"))[: args.n_test]
    if args.model:
        rows = [mechanism_probe(load_probed(args.model, task=task).hf_model.eval(), task, test)]
        label, cfg_dict = args.label or Path(args.model).name, {"model": args.model}
    else:
        overrides = parse_overrides(args.set)
        cfg = default_config(get_task("counting")).replace(**overrides)
        label = args.label or ("_".join(f"{k}{v}" for k, v in overrides.items()) or "default")
        cfg_dict = {**cfg.__dict__, "screen_steps": args.steps, "device": args.device, "minutes": args.minutes}
        model, rows = screen(task, cfg, args.steps, args.every, test, args.device, args.minutes)
        if args.save:
            model.eval()
            metrics = evaluate_model(ModelRunner(model), task, "test", limit=cfg.eval_limit, seed=cfg.seed)
            metrics.update({"train_wall_seconds": rows[-1]["seconds"], "train_steps": rows[-1]["step"],
                            "device": args.device, "final_loss": rows[-1]["loss"]})
            write_trained(model, task, cfg, Path(args.save), metrics, rows,
                          trained_by="research/counting_recipe/counting_recipe_screen.py", screen=cfg_dict)
            print(f"saved {args.save}: accuracy {metrics.get('accuracy')}")
    dest = Path(args.results) if args.results else HERE / "results" / f"counting_screen_{label}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"config": cfg_dict, "threads": args.threads, "n_test": len(test), "rows": rows},
                               indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


def screen(task: Task, cfg: TrainConfig, steps: int, every: int, test: list[str], device: str = "cpu",
           minutes: float | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Train for ``steps`` (or ``minutes``), probing every ``every`` steps and at the end."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_model(task, cfg)
    if cfg.init_from:
        model.load_state_dict(load_probed(cfg.init_from, task=task).hf_model.state_dict())
    model.to(device)
    opt = make_optimizer(model, cfg)
    next_batch = batches(task, cfg, rng, device)
    ema, rows, t0 = None, [], time.perf_counter()

    def probe(step: int) -> None:
        model.eval()
        row = {"step": step, "loss": round(ema, 4), "seconds": round(time.perf_counter() - t0, 1),
               **mechanism_probe(model, task, test)}
        model.train()
        rows.append(row)
        print(json.dumps(row), flush=True)

    for step in range(steps):
        loss = train_step(model, opt, task, next_batch(), step, cfg)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if (step + 1) % every == 0:
            probe(step + 1)
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            break
    if not rows or rows[-1]["step"] != step + 1:
        probe(step + 1)
    return model, rows


def batches(task: Task, cfg: TrainConfig, rng: random.Random, device: str):
    """A function returning the next training batch (ids [batch, pos], trailing padding trimmed).

    On the CPU: texts drawn with ``rng`` and encoded per batch (as ``circuitkit model train``).
    Elsewhere: the split is encoded once onto the device and rows drawn there (encoding per batch
    would cost more than the step).
    """
    pad = task.vocab.pad_id
    train = task.split("train")
    if device == "cpu":
        sampler = UniformSampler(train)
        return lambda: trim_padding(task.encode(sampler.batch(rng, cfg.batch_size)), pad)
    all_ids = encode_all(task, train).to(device)  # [n_train, seq]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return lambda: trim_padding(all_ids[torch.randint(len(all_ids), (cfg.batch_size,), device=device, generator=gen)], pad)


if __name__ == "__main__":
    sys.exit(main())
