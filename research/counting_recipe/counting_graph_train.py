"""Fast continuation of a counting model on a GPU: the whole training step captured as a CUDA graph.

The paper's counting run (914,100 steps, lr 5e-4, batch 128) sat at the loss plateau of our normal-init
model (~0.22, the count read at ``:`` from a bag of letters) for ~230k steps before its mechanism formed.
(The committed model, trained with the mimetic attention init, is past it; pass a plateau model as
``--init-from`` to repeat the continuation.)
An eager HF training step runs at a few hundred steps per second on a GPU (launch-bound); this
script captures forward, backward, gradient clipping and AdamW as one CUDA graph on a fixed
[batch, 33] shape, with the loss at ``:`` only (as ``circuitkit model train``), so one replay is one
launch. The forward is a functional GPT-2 over the HF model's own parameters
(``gpt2_logits_at``, checked against HF's forward by ``--check``), so the trained weights are
saved with the HF model they live in.

    python research/counting_recipe/counting_graph_train.py --init-from case_studies/models/counting --lr 5e-4 \\
        --batch-size 128 --minutes 5 --out OUT --label lr5e-4_b128
    .venv/bin/python research/counting_recipe/counting_graph_train.py --check   # CPU: functional forward == HF forward

Writes OUT/LABEL.json (probe rows: steps, loss, test accuracy, a0.0's same-letter attention share)
and OUT/LABEL.pt (the model's state dict, rewritten at every probe). ``--finish DIR`` turns a
state dict into a circuitkit checkpoint (metrics, manifest) on any machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from circuitkit.models.checkpoint import load_probed
from circuitkit.models.train import build_model, default_config
from circuitkit.tasks import get_task
from circuitkit.tasks.base import Task

HERE = Path(__file__).resolve().parent


def encode_all(task: Task, texts: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Token ids [n, seq_len] of single-character-token texts, vectorised (task.encode is per text)."""
    lut = np.full(256, -1, dtype=np.int64)
    for i, tok in enumerate(task.vocab.tokens):
        lut[ord(tok)] = i
    pad = task.vocab.tokens[task.vocab.pad_id]
    raw = np.frombuffer("".join(t.ljust(task.seq_len, pad) for t in texts).encode("ascii"), dtype=np.uint8)
    ids = lut[raw].reshape(len(texts), task.seq_len)
    if (ids < 0).any():
        raise ValueError("a text holds a character outside the vocabulary")
    return torch.from_numpy(ids)


def gpt2_logits_at(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits [batch, vocab] at position ``pos`` [batch] of each row of ids [batch, seq], computed from
    the HF GPT2LMHeadModel's parameters (Conv1D weights are [in, out]; gelu_new = tanh GELU)."""
    tr = model.transformer
    b, t = ids.shape
    d = tr.wte.weight.shape[1]
    n_head = model.config.n_head
    h = tr.wte.weight[ids] + tr.wpe.weight[:t]  # [batch, seq, d]
    for blk in tr.h:
        x = F.layer_norm(h, (d,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        qkv = x @ blk.attn.c_attn.weight + blk.attn.c_attn.bias  # [batch, seq, 3d]
        q, k, v = (z.reshape(b, t, n_head, d // n_head).transpose(1, 2) for z in qkv.split(d, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [batch, head, seq, d_head]
        h = h + att.transpose(1, 2).reshape(b, t, d) @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        x = F.layer_norm(h, (d,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        x = F.gelu(x @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias, approximate="tanh")
        h = h + x @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
    h = h[torch.arange(b, device=ids.device), pos]  # [batch, d]
    h = F.layer_norm(h, (d,), tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
    return h @ model.lm_head.weight.T


def count_loss(model: torch.nn.Module, ids: torch.Tensor, colon: int) -> torch.Tensor:
    """Cross-entropy of the count predicted at ``:`` (each row holds one ``:``). ids: [batch, seq]."""
    pos = (ids == colon).int().argmax(dim=1)  # [batch]
    target = ids.gather(1, (pos + 1)[:, None]).squeeze(1)
    return F.cross_entropy(gpt2_logits_at(model, ids, pos), target)


def check(task: Task, model_dir: str) -> int:
    """The functional forward and loss against HF's forward on the CPU."""
    model = load_probed(model_dir, task=task).hf_model.eval()
    texts = list(task.split("test")[:256])
    ids = encode_all(task, texts)
    assert torch.equal(ids, task.encode(texts)), "vectorised encoding differs from task.encode"
    colon = task.vocab.id_of(":")
    pos = (ids == colon).int().argmax(dim=1)
    with torch.no_grad():
        ours = gpt2_logits_at(model, ids, pos)
        ref = model(input_ids=ids).logits[torch.arange(len(ids)), pos]
    err = float((ours - ref).abs().max())
    print(json.dumps({"max_abs_logit_difference": err, "n": len(texts)}))
    return 0 if err < 1e-3 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init-from", default="case_studies/models/counting")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=1000, help="eager steps with a linear lr warm-up before capture")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--probe-seconds", type=float, default=30.0)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", default="runs/counting_graph")
    ap.add_argument("--label", default="run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check", action="store_true", help="compare the functional forward with HF's and exit")
    ap.add_argument("--finish", metavar="DIR", help="write --out/--label's state dict as a checkpoint in DIR and exit")
    args = ap.parse_args()
    task = get_task("counting")
    if args.check:
        return check(task, args.init_from)
    if args.finish:
        return finish(task, args)
    return train(task, args)


def train(task: Task, args: argparse.Namespace) -> int:
    from counting_recipe_screen import mechanism_probe  # the same probe as the recipe screen

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_probed(args.init_from, task=task).hf_model.to(dev).train()
    test = list(task.split("test")[: args.n_test])
    all_ids = encode_all(task, task.split("train")).to(dev)  # [n_train, seq]
    colon = task.vocab.id_of(":")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98),
                            capturable=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    static_idx = torch.zeros(args.batch_size, dtype=torch.long, device=dev)
    loss_sum = torch.zeros((), device=dev)

    def step() -> torch.Tensor:
        loss = count_loss(model, all_ids[static_idx], colon)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    rows: list[dict] = []
    t0 = time.perf_counter()
    n_steps, n_since = 0, 0

    def probe() -> None:
        nonlocal n_since
        model.eval()
        with torch.no_grad():
            row = {"step": n_steps, "seconds": round(time.perf_counter() - t0, 1),
                   "loss": round(float(loss_sum) / n_since, 4) if n_since else None, **mechanism_probe(model, task, test)}
        model.train()
        loss_sum.zero_()
        n_since = 0
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / f"{args.label}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        torch.save(model.state_dict(), out / f"{args.label}.pt.tmp")
        os.replace(out / f"{args.label}.pt.tmp", out / f"{args.label}.pt")

    def draw() -> None:
        static_idx.copy_(torch.randint(len(all_ids), (args.batch_size,), device=dev, generator=gen))

    for i in range(args.warmup):  # eager, lr warm-up from the fresh optimizer state
        opt.param_groups[0]["lr"] = args.lr * (i + 1) / args.warmup
        draw()
        opt.zero_grad(set_to_none=True)
        loss_sum.add_(step().detach())
        n_steps += 1
        n_since += 1
    opt.param_groups[0]["lr"] = args.lr
    graph = None
    if dev.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                draw()
                opt.zero_grad(set_to_none=True)
                step()
                n_steps += 1
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(graph):
                static_loss = step()
        except RuntimeError as e:  # keep training, eagerly, rather than lose the run
            print(f"CUDA graph capture failed ({e}); continuing eagerly", flush=True)
            graph = None
    probe()
    next_probe = time.perf_counter() + args.probe_seconds
    while time.perf_counter() - t0 < 60 * args.minutes:
        for _ in range(500):
            draw()
            if graph is not None:
                graph.replay()
                loss_sum.add_(static_loss.detach())
            else:
                opt.zero_grad(set_to_none=True)
                loss_sum.add_(step().detach())
            n_steps += 1
            n_since += 1
        if time.perf_counter() >= next_probe:
            probe()
            next_probe = time.perf_counter() + args.probe_seconds
    probe()
    return 0


def finish(task: Task, args: argparse.Namespace) -> int:
    """Load OUT/LABEL.pt into the counting architecture and write a circuitkit checkpoint."""
    from circuitkit.models.evaluate import evaluate_model
    from circuitkit.models.runner import ModelRunner
    from circuitkit.models.train import write_trained

    run = json.loads((Path(args.out) / f"{args.label}.json").read_text())
    cfg = default_config(get_task("counting")).replace(lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                                      warmup=args.warmup, min_lr_ratio=1.0, init_from=args.init_from,
                                      seed=args.seed, steps=run["rows"][-1]["step"])
    model = build_model(task, cfg)
    model.load_state_dict(torch.load(Path(args.out) / f"{args.label}.pt", map_location="cpu"))
    model.eval()
    metrics = evaluate_model(ModelRunner(model), task, "test", limit=cfg.eval_limit, seed=cfg.seed, progress=True)
    metrics.update({"train_steps_continued": run["rows"][-1]["step"], "train_wall_seconds_continued":
                    run["rows"][-1]["seconds"], "device": "cuda (CUDA-graph continuation)"})
    write_trained(model, task, cfg, Path(args.finish), metrics, run["rows"],
                  trained_by="research/counting_recipe/counting_graph_train.py", continuation=run["args"])
    print(json.dumps(metrics))
    return 0 if math.isfinite(metrics.get("accuracy", float("nan"))) else 1


if __name__ == "__main__":
    sys.exit(main())
