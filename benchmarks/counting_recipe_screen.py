"""Short counting training runs that show *which mechanism* a recipe is heading for.

The paper's counting model computes the count at the query letter (a0.0 there attends to the same
letter) and a1.0 copies it to ``:``; our default recipe instead computes it at ``:`` and saturates
near 91%. This screen trains the paper architecture with a recipe (the defaults of
``circuitkit model train counting`` plus overrides) for a few thousand steps and records, every
``--every`` steps, the loss, held-out accuracy and the share of a0.0's attention at the query letter
that lands on occurrences of that letter (about 0.3 for a uniform head). ``--model DIR`` measures a
trained checkpoint instead.

    .venv/bin/python benchmarks/counting_recipe_screen.py --set seed=1 --steps 8000 --threads 1
    .venv/bin/python benchmarks/counting_recipe_screen.py --model case_studies/models/counting

Writes results/counting_screen_<label>.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from circuitkit.models.train import DEFAULTS, UniformSampler, build_model, make_optimizer, train_step, trim_padding
from circuitkit.tasks import get_task
from circuitkit.tasks.base import Task

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def mechanism_probe(model: torch.nn.Module, task: Task, texts: list[str]) -> dict[str, float]:
    """Accuracy at ``:`` and a0.0's attention at the query letter: share on the same letter, share on BOS."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")  # sdpa does not return attention patterns
    ids = task.encode(texts)  # [batch, pos]
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("counting")
    test = list(task.split("test"))[: args.n_test]
    if args.model:
        from circuitkit.models.checkpoint import load_probed

        rows = [mechanism_probe(load_probed(args.model, task=task).hf_model.eval(), task, test)]
        label, cfg_dict = args.label or Path(args.model).name, {"model": args.model}
    else:
        overrides = parse_overrides(args.set)
        cfg = DEFAULTS["counting"].replace(**overrides)
        label = args.label or ("_".join(f"{k}{v}" for k, v in overrides.items()) or "default")
        cfg_dict = {**cfg.__dict__, "screen_steps": args.steps}
        rows = screen(task, cfg, args.steps, args.every, test)
    dest = HERE / "results" / f"counting_screen_{label}.json"
    dest.write_text(json.dumps({"config": cfg_dict, "threads": args.threads, "n_test": len(test), "rows": rows},
                               indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


def screen(task: Task, cfg, steps: int, every: int, test: list[str]) -> list[dict]:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_model(task, cfg)
    opt = make_optimizer(model, cfg)
    sampler = UniformSampler(task.split("train"))
    ema, rows, t0 = None, [], time.perf_counter()
    for step in range(steps):
        ids = trim_padding(task.encode(sampler.batch(rng, cfg.batch_size)), task.vocab.pad_id)
        loss = train_step(model, opt, task, ids, step, cfg)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if (step + 1) % every == 0:
            model.eval()
            row = {"step": step + 1, "loss": round(ema, 4), "seconds": round(time.perf_counter() - t0, 1),
                   **mechanism_probe(model, task, test)}
            model.train()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
