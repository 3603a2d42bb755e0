"""Train an InversionView decoder for every paper site of a probed model, with resume.

Every step draws a fresh batch for one site (``data.PairSource``: new inputs, one random
non-special position each, the probed model run only as far as the site), or with ``mixed_sites``
a site per input.  Sites are drawn with weights that favour those whose hit rate lags
(re-estimated every ``eval_every`` steps on a few held-out queries; with ``eval_window`` > 1 each
estimate draws fresh queries and the weights use the hit rate pooled over the last estimates).  The
learning rate warms up and then follows a cosine over the run, whose length is ``steps`` or, when ``minutes`` is set,
whichever of steps and minutes runs out first.

State lives in ``<out>.partial/`` (checkpointed every ``checkpoint_every`` steps and on Ctrl-C);
rerunning the same command resumes.  The finished decoder appears in ``<out>/`` by rename.
Under ``torch.distributed`` (see ``distributed.py``) the model is wrapped in
DistributedDataParallel, every rank draws its own data, and rank 0 evaluates and writes.
"""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from circuitkit.errors import CircuitkitError
from circuitkit.inversion.checkpoint import save_decoder
from circuitkit.inversion.data import PairSource, activation_scale
from circuitkit.inversion.decoder import DecoderConfig, InversionDecoder
from circuitkit.inversion.evaluate import evaluate_decoder, evaluate_site
from circuitkit.io_utils import atomic_dir, atomic_torch_save, atomic_write_json, safe_torch_load
from circuitkit.manifest import write_manifest
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site, paper_sites


@dataclass
class DecoderTrainConfig:
    """Decoder architecture and optimisation (paper architecture by default)."""

    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    cond_mid: int = 512
    n_cond_blocks: int = 6
    n_slots: int = 1  # activation slots per decoder layer (the paper: 1)
    mixed_sites: bool = False  # a site per input rather than per batch (the paper: per batch)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    steps: int = 20000
    minutes: float | None = None  # wall-clock training budget (evaluation time excluded)
    min_lr_ratio: float = 0.05
    eval_every: int = 200  # steps between hit-rate estimates (rebalancing, curve)
    eval_queries: int = 16  # held-out queries per site for those estimates
    eval_per_cell: int = 4  # samples per (temperature, noise) cell for those estimates
    # estimates pooled for the rebalancing weights; > 1 draws fresh queries for each (1: the same queries each time)
    eval_window: int = 1
    final_eval_queries: int = 200
    final_eval_per_cell: int = 16
    rebalance_floor: float = 0.1
    checkpoint_every: int = 500
    seed: int = 0
    threads: int | None = None
    # torch.compile the decoder's training forward/backward (Inductor; needs a C++ compiler on the CPU). On 2 CPU
    # cores it saved nothing (benchmarks/results/decoder_step.json); its compile time counts as training time
    compile: bool = False

    def replace(self, **kw: Any) -> DecoderTrainConfig:
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise CircuitkitError(f"unknown decoder training options {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_slots", "batch_size", "steps", "eval_every", "eval_queries",
                     "eval_per_cell", "eval_window", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise CircuitkitError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise CircuitkitError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.minutes is not None and self.minutes <= 0:
            raise CircuitkitError(f"minutes must be positive, got {self.minutes}")


def decoder_sites(probed: ProbedModel) -> list[Site]:
    """The paper's sites for a model: MLP outputs are decoded only for single-head models (counting)."""
    return paper_sites(probed.n_layers, probed.n_heads, include_mlp=probed.n_heads == 1)


def site_weights(hit_rates: Sequence[float], floor: float) -> list[float]:
    """Sampling weights ∝ floor + (1 − hit rate): lagging sites get more batches."""
    w = [floor + (1.0 - h) for h in hit_rates]
    tot = sum(w)
    return [x / tot for x in w]


def pooled_hit_rates(window: Sequence[Sequence[float]]) -> list[float]:
    """Per-site hit rate over the estimates in ``window`` (each a list of per-site rates over equal query counts)."""
    return [sum(col) / len(col) for col in zip(*window)]


def estimate_seed(step: int, cfg: DecoderTrainConfig) -> int:
    """Held-out query seed of the estimate at ``step``: fixed with no pooling, fresh for every pooled estimate."""
    return 4321 if cfg.eval_window == 1 else 4321 + step


def decoder_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token cross-entropy over every real target token (EOS included, PAD excluded)."""
    tgt = ids[:, 1:]
    mask = tgt != pad_id
    return F.cross_entropy(logits[:, :-1][mask], tgt[mask])


def _lr_factor(progress: float, step: int, cfg: DecoderTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = min(1.0, max(0.0, progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def train_forward(model: torch.nn.Module, ids: torch.Tensor, acts: torch.Tensor, site_idx: torch.Tensor,
                  compiled: bool) -> torch.Tensor:
    """Teacher-forced logits; a compiled model that cannot be built says what to do instead of a backend trace."""
    try:
        return model(ids, acts, site_idx)
    except Exception as e:  # Inductor reports a missing compiler or an unsupported op as a backend error
        if compiled and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise CircuitkitError(f"torch.compile of the decoder failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); train without compile "
                                  f"([decoder] compile = false, or drop --compile)") from None
        raise


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_for(probed: ProbedModel, sites: Sequence[Site], cfg: DecoderTrainConfig) -> InversionDecoder:
    dcfg = DecoderConfig(vocab_size=len(probed.task.vocab), seq_len=probed.task.seq_len,
                         act_dim=probed.runner.d_model, n_sites=len(sites), d_model=cfg.d_model,
                         n_layers=cfg.n_layers, n_heads=cfg.n_heads, cond_mid=cfg.cond_mid,
                         n_cond_blocks=cfg.n_cond_blocks, n_slots=cfg.n_slots)
    torch.manual_seed(cfg.seed)
    dec = InversionDecoder(dcfg)
    with torch.no_grad():
        for i, s in enumerate(sites):
            dec.act_scale[i] = activation_scale(probed, s, seed=cfg.seed)
    return dec


def train_decoder(probed: ProbedModel, out: str | Path, cfg: DecoderTrainConfig | None = None,
                  sites: Sequence[Site] | None = None, progress: bool = True, device: str = "cpu",
                  on_eval: Callable[[dict], None] | None = None, _keep: dict | None = None,
                  partial: str | Path | None = None) -> dict:
    """Train a decoder for ``sites`` (default: the paper's) of ``probed``; write it to ``out``.

    ``partial``: where an interrupted run keeps its state (default ``<out>.partial``); a caller that writes
    ``out`` inside a temporary directory passes a path outside it, so the state outlives the interruption."""
    cfg = cfg or DecoderTrainConfig()
    cfg.validate()
    out = Path(out)
    rank, world = _dist_info()
    if out.exists() and any(out.iterdir()):
        raise CircuitkitError(f"output directory {str(out)!r} exists and is not empty; choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CircuitkitError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if str(probed.device) != str(torch.device(device)):
        probed.hf_model.to(device)
    sites = list(sites or decoder_sites(probed))
    partial = Path(partial) if partial is not None else out.with_name(out.name + ".partial")
    state_file = partial / "train_state.pt"
    dec = build_for(probed, sites, cfg).to(device)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    source = PairSource(probed, "train", seed=cfg.seed + 1000 * rank)
    site_rng = random.Random(cfg.seed)  # identical on every rank: all replicas train the same site per step
    step, train_s, history = 0, 0.0, []
    hits = [0.0] * len(sites)
    window: list[list[float]] = []  # the last ``eval_window`` estimates, oldest first
    ema: float | None = None
    resumed_from = None
    if state_file.exists():
        state = safe_torch_load(state_file, "interrupted decoder training state", map_location=device)
        if not isinstance(state, dict) or state.get("config") != dataclasses.asdict(cfg) or state.get("sites") != [
                s.node for s in sites]:
            raise CircuitkitError(f"{str(partial)!r} holds an interrupted run with different options; delete it "
                                  f"to start over, or rerun with the same options to resume")
        try:
            dec.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, train_s, history, hits = state["step"], state["train_s"], state["history"], state["hits"]
            ema = state.get("ema")
            window = state.get("window", [])
            resumed_from = step
            site_rng.setstate(tuple(state["site_rng"]) if isinstance(state["site_rng"], list) else state["site_rng"])
            if rank == 0:
                source.load_state(state["source"])
            else:
                source = PairSource(probed, "train", seed=cfg.seed + 1000 * rank + step)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CircuitkitError(f"{str(state_file)!r} is not a complete decoder training state "
                                  f"({type(e).__name__}: {e}); delete {str(partial)!r} to start over") from None
    model: torch.nn.Module = dec
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(dec, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    if cfg.compile:  # training steps only; sampling and evaluation run ``dec`` eagerly
        model = torch.compile(model)
    weights = site_weights(hits, cfg.rebalance_floor)
    pad = probed.task.vocab.pad_id
    budget_s = None if cfg.minutes is None else cfg.minutes * 60.0

    def save_state() -> None:
        if rank != 0:
            return
        atomic_torch_save({"model": dec.state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "train_s": train_s, "history": history, "hits": hits, "config": dataclasses.asdict(cfg),
                           "sites": [s.node for s in sites], "site_rng": site_rng.getstate(),
                           "source": source.state(), "ema": ema, "window": window}, state_file)

    def estimate() -> None:
        nonlocal hits, weights, window
        if rank == 0:
            rows = [evaluate_site(dec, probed, s, i, n_queries=cfg.eval_queries, n_per_cell=cfg.eval_per_cell,
                                  seed=estimate_seed(step, cfg)) for i, s in enumerate(sites)]
            window = [*window, [r["hit_rate"] for r in rows]][-cfg.eval_window:]
            hits = pooled_hit_rates(window)
            rec = {"step": step, "train_minutes": round(train_s / 60, 3), "loss": ema,
                   "hit_rate": {r["site"]: r["hit_rate"] for r in rows}}
            if cfg.eval_window > 1:
                rec["pooled_hit_rate"] = {r["site"]: h for r, h in zip(rows, hits)}
            history.append(rec)
            if on_eval:
                on_eval(rec)
        if world > 1:
            t = torch.tensor(hits, dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
            dist.broadcast(t, 0)
            hits = t.tolist()
        weights = site_weights(hits, cfg.rebalance_floor)

    def done() -> bool:
        return step >= cfg.steps or (budget_s is not None and train_s >= budget_s)

    bar = tqdm(total=cfg.steps, initial=step, desc="decoder", disable=not progress or rank != 0, unit="step")
    model.train()
    try:
        while not done():
            t0 = time.perf_counter()
            if cfg.mixed_sites:
                pairs, site_idx = source.mixed(sites, weights, cfg.batch_size)
            else:
                i = site_rng.choices(range(len(sites)), weights=weights)[0]
                pairs = source.batch(sites[i], cfg.batch_size)
                site_idx = torch.full((cfg.batch_size,), i)
            frac = step / cfg.steps if budget_s is None else max(step / cfg.steps, train_s / budget_s)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(frac, step, cfg)
            ids = pairs.ids.to(device)
            logits = train_forward(model, ids, pairs.acts.to(device), site_idx.to(device), cfg.compile)
            loss = decoder_loss(logits, ids, pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
            opt.step()
            step += 1
            lv = loss.item()
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if world > 1:  # every rank must agree on when the budget runs out
                t = torch.tensor([time.perf_counter() - t0], device=device if device.startswith("cuda") else "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                train_s += float(t)
            else:
                train_s += time.perf_counter() - t0
            bar.update(1)
            if step % cfg.eval_every == 0 or done():
                estimate()
                bar.set_postfix_str(f"loss={ema:.3f} hit=" + "/".join(f"{h:.2f}" for h in hits))
            elif step % 10 == 0:
                bar.set_postfix_str(f"loss={ema:.3f} hit=" + "/".join(f"{h:.2f}" for h in hits))
            if step % cfg.checkpoint_every == 0 and not done():
                save_state()
    except KeyboardInterrupt:
        save_state()
        bar.close()
        raise CircuitkitError(f"interrupted at step {step}; rerun the same command to resume from {partial}") from None
    bar.close()
    metrics: dict = {"steps": step, "train_minutes": round(train_s / 60, 3), "final_loss": ema,
                     "world_size": world, "torch_threads": torch.get_num_threads(), "resumed_from_step": resumed_from}
    if rank == 0:
        dec.eval()
        if cfg.final_eval_queries > 0:
            metrics["eval"] = evaluate_decoder(dec, probed, sites, n_queries=cfg.final_eval_queries,
                                               n_per_cell=cfg.final_eval_per_cell)
        with atomic_dir(out) as tmp:
            save_decoder(tmp, dec, probed, sites, {"train_config": dataclasses.asdict(cfg)})
            atomic_write_json(tmp / "metrics.json", metrics)
            atomic_write_json(tmp / "train_history.json", history)
            write_manifest(tmp, "inversion_decoder", cfg.seed, dataclasses.asdict(cfg),
                           probed_model=str(probed.path) if probed.path else None,
                           steps_taken=step, stopped_by="steps" if step >= cfg.steps else "minutes")
        shutil.rmtree(partial, ignore_errors=True)
    if world > 1:
        dist.barrier()
    if _keep is not None:
        _keep["decoder"] = dec
    return {"history": history, **metrics}
