"""Train an InversionView decoder for every paper site of a probed model, with resume.

Every step draws a fresh batch for one site (``data.PairSource``: new inputs, one random
non-special position each, the probed model run only as far as the site), or with ``mixed_sites``
a site per input.  Sites are drawn with weights that favour those whose hit rate lags
(re-estimated every ``eval_every`` steps on a few held-out queries; with ``eval_window`` > 1 each
estimate draws fresh queries and the weights use the hit rate pooled over the last estimates).  The
learning rate warms up and then follows a cosine over the run, whose length is ``steps`` or, when ``minutes`` is set,
whichever of steps and minutes runs out first.  A batch's forward and backward run in groups of rows of similar
length, each trimmed to its longest row (``backward_by_length``): the whole batch's gradients, fewer PAD columns.

State lives in ``<out>.partial/`` (checkpointed every ``checkpoint_every`` steps and on Ctrl-C);
rerunning the same command resumes.  The finished decoder appears in ``<out>/`` by rename.
Under ``torch.distributed`` (see ``distributed.py``) the model is wrapped in
DistributedDataParallel, every rank draws its own data, and rank 0 evaluates and writes.
"""
from __future__ import annotations

import contextlib
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
from circuitkit.inversion.data import Pairs, PairSource, activation_scale
from circuitkit.inversion.decoder import DecoderConfig, InversionDecoder
from circuitkit.inversion.evaluate import evaluate_decoder, evaluate_site
from circuitkit.io_utils import atomic_dir, atomic_torch_save, atomic_write_json, safe_torch_load
from circuitkit.manifest import write_manifest
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.train import trim_padding
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
    # rows of similar length run together, each group trimmed to its longest row (1: the whole batch, trimmed to
    # its longest); the gradients are the whole batch's. Counting's steps: 10% faster with 2 (its lengths vary;
    # benchmarks/results/decoder_length_groups.json)
    length_groups: int = 2

    def replace(self, **kw: Any) -> DecoderTrainConfig:
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise CircuitkitError(f"unknown decoder training options {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_slots", "batch_size", "steps", "eval_every", "eval_queries",
                     "eval_per_cell", "eval_window", "checkpoint_every", "length_groups"):
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
    return [sum(col) / len(col) for col in zip(*window, strict=False)]


def estimate_seed(step: int, cfg: DecoderTrainConfig) -> int:
    """Held-out query seed of the estimate at ``step``: fixed with no pooling, fresh for every pooled estimate."""
    return 4321 if cfg.eval_window == 1 else 4321 + step


def decoder_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token cross-entropy over every real target token (EOS included, PAD excluded)."""
    tgt = ids[:, 1:]
    mask = tgt != pad_id
    return F.cross_entropy(logits[:, :-1][mask], tgt[mask])


def length_groups(ids: torch.Tensor, pad_id: int, n_groups: int, min_saving: float = 0.1) -> list[torch.Tensor]:
    """Row indices of ``ids`` [batch, pos] sorted by real length and cut into at most ``n_groups`` equal parts.

    Neighbouring parts whose longest rows are equally long are merged, and the batch stays whole (in its own
    order) unless trimming each part to its longest row cuts at least ``min_saving`` of the columns: every
    extra forward has a fixed cost (on 2 CPU cores, four parts of 32 rows ran slower than two of 64)."""
    lengths = (ids != pad_id).sum(1)  # [batch]
    order = torch.sort(lengths, stable=True).indices
    groups: list[torch.Tensor] = []
    for part in order.chunk(n_groups):
        if groups and lengths[groups[-1]].max() == lengths[part].max():
            groups[-1] = torch.cat([groups[-1], part])
        else:
            groups.append(part)
    columns = sum(len(g) * int(lengths[g].max()) for g in groups)
    if columns > (1 - min_saving) * len(ids) * int(lengths.max()):
        return [torch.arange(len(ids), device=ids.device)]
    return groups


def backward_by_length(model: torch.nn.Module, ids: torch.Tensor, acts: torch.Tensor, site_idx: torch.Tensor,
                       pad_id: int, n_groups: int, compiled: bool) -> float:
    """Forward and backward of ``decoder_loss`` over the batch, run a length group at a time.

    Each group (``length_groups``) is trimmed to its longest row; the decoder is causal, so the columns cut are
    PAD that no real position attends to. Each group's summed cross-entropy is divided by the batch's target
    count, so the accumulated gradients are the whole batch's. Under DDP the gradients are all-reduced once, after
    the last group. ids [batch, seq_len], acts [batch, act_dim], site_idx [batch]; returns the batch's loss."""
    n_targets = (ids[:, 1:] != pad_id).sum()
    groups = length_groups(ids, pad_id, n_groups)
    # DDP's no_sync (on the module, or under a torch.compile wrapper); None when not distributed
    no_sync = getattr(model, "no_sync", None) or getattr(getattr(model, "_orig_mod", None), "no_sync", None)
    total = torch.zeros((), device=ids.device)
    for j, rows in enumerate(groups):
        last = j == len(groups) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            sub = trim_padding(ids[rows], pad_id)  # [rows, longest]
            logits = train_forward(model, sub, acts[rows], site_idx[rows], compiled)  # [rows, longest, vocab]
            tgt = sub[:, 1:]
            mask = tgt != pad_id
            loss = F.cross_entropy(logits[:, :-1][mask], tgt[mask], reduction="sum") / n_targets
            loss.backward()
        total += loss.detach()
    return float(total)


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


@dataclass(frozen=True)
class _DecoderRun:
    """What one decoder training run holds fixed: the models, optimiser, sites, device, ranks and state paths."""

    probed: ProbedModel
    cfg: DecoderTrainConfig
    sites: list[Site]
    dec: InversionDecoder
    model: torch.nn.Module  # ``dec``, or its DDP / torch.compile wrapper that the training steps run
    opt: torch.optim.Optimizer
    device: str
    rank: int
    world: int
    partial: Path
    state_file: Path
    on_eval: Callable[[dict], None] | None
    pad_id: int  # the task's PAD token, excluded from the loss

    @property
    def budget_s(self) -> float | None:
        """The wall-clock training budget in seconds (None: steps alone end the run)."""
        return None if self.cfg.minutes is None else self.cfg.minutes * 60.0

    @property
    def reduce_device(self) -> str:
        """Where tensors for collectives live: the CUDA device for NCCL, else the CPU."""
        return self.device if self.device.startswith("cuda") else "cpu"


@dataclass
class _DecoderProgress:
    """What a decoder training run changes as it goes (and checkpoints, with the model and optimiser)."""

    source: PairSource
    site_rng: random.Random  # identical on every rank: all replicas train the same site per step
    hits: list[float]
    step: int = 0
    train_s: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)
    window: list[list[float]] = dataclasses.field(default_factory=list)  # the last ``eval_window`` estimates
    ema: float | None = None
    resumed_from: int | None = None
    weights: list[float] = dataclasses.field(default_factory=list)


def _check_and_place(probed: ProbedModel, out: Path, cfg: DecoderTrainConfig, device: str) -> None:
    """Refuse a non-empty ``out`` or a missing CUDA device; set threads and move the probed model to ``device``."""
    if out.exists() and any(out.iterdir()):
        raise CircuitkitError(f"output directory {str(out)!r} exists and is not empty; choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CircuitkitError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if str(probed.device) != str(torch.device(device)):
        probed.hf_model.to(device)


def _resume(run: _DecoderRun, prog: _DecoderProgress) -> None:
    """Load an interrupted run's state into ``run``'s decoder and optimiser and ``prog``, when there is one."""
    if not run.state_file.exists():
        return
    cfg, rank = run.cfg, run.rank
    state = safe_torch_load(run.state_file, "interrupted decoder training state", map_location=run.device)
    if not isinstance(state, dict) or state.get("config") != dataclasses.asdict(cfg) or state.get("sites") != [
            s.node for s in run.sites]:
        raise CircuitkitError(f"{str(run.partial)!r} holds an interrupted run with different options; delete it "
                              f"to start over, or rerun with the same options to resume")
    try:
        run.dec.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        prog.step, prog.train_s, prog.history, prog.hits = (state["step"], state["train_s"], state["history"],
                                                            state["hits"])
        prog.ema = state.get("ema")
        prog.window = state.get("window", [])
        prog.resumed_from = prog.step
        prog.site_rng.setstate(tuple(state["site_rng"]) if isinstance(state["site_rng"], list)
                               else state["site_rng"])
        if rank == 0:
            prog.source.load_state(state["source"])
        else:
            prog.source = PairSource(run.probed, "train", seed=cfg.seed + 1000 * rank + prog.step)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CircuitkitError(f"{str(run.state_file)!r} is not a complete decoder training state "
                              f"({type(e).__name__}: {e}); delete {str(run.partial)!r} to start over") from None


def _wrap_model(run: _DecoderRun) -> torch.nn.Module:
    """The module the training steps run: ``dec`` under DDP when distributed, compiled when asked."""
    model: torch.nn.Module = run.dec
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(run.dec, device_ids=[torch.device(run.device).index] if run.device.startswith("cuda") else None)
    if run.cfg.compile:  # training steps only; sampling and evaluation run ``dec`` eagerly
        model = torch.compile(model)
    return model


def _save_state(run: _DecoderRun, prog: _DecoderProgress) -> None:
    """Checkpoint everything a resume needs (rank 0 only: every rank holds the same model)."""
    if run.rank != 0:
        return
    atomic_torch_save({"model": run.dec.state_dict(), "optimizer": run.opt.state_dict(), "step": prog.step,
                       "train_s": prog.train_s, "history": prog.history, "hits": prog.hits,
                       "config": dataclasses.asdict(run.cfg), "sites": [s.node for s in run.sites],
                       "site_rng": prog.site_rng.getstate(), "source": prog.source.state(), "ema": prog.ema,
                       "window": prog.window}, run.state_file)


def _estimate(run: _DecoderRun, prog: _DecoderProgress) -> None:
    """Re-estimate per-site hit rates on held-out queries (rank 0, shared by broadcast) and the site weights."""
    cfg = run.cfg
    if run.rank == 0:
        rows = [evaluate_site(run.dec, run.probed, s, i, n_queries=cfg.eval_queries, n_per_cell=cfg.eval_per_cell,
                              seed=estimate_seed(prog.step, cfg)) for i, s in enumerate(run.sites)]
        prog.window = [*prog.window, [r["hit_rate"] for r in rows]][-cfg.eval_window:]
        prog.hits = pooled_hit_rates(prog.window)
        rec = {"step": prog.step, "train_minutes": round(prog.train_s / 60, 3), "loss": prog.ema,
               "hit_rate": {r["site"]: r["hit_rate"] for r in rows}}
        if cfg.eval_window > 1:
            rec["pooled_hit_rate"] = {r["site"]: h for r, h in zip(rows, prog.hits, strict=False)}
        prog.history.append(rec)
        if run.on_eval:
            run.on_eval(rec)
    if run.world > 1:
        t = torch.tensor(prog.hits, dtype=torch.float64, device=run.reduce_device)
        dist.broadcast(t, 0)
        prog.hits = t.tolist()
    prog.weights = site_weights(prog.hits, cfg.rebalance_floor)


def _done(run: _DecoderRun, prog: _DecoderProgress) -> bool:
    """Whether the run has used up its steps or its wall-clock budget."""
    budget_s = run.budget_s
    return prog.step >= run.cfg.steps or (budget_s is not None and prog.train_s >= budget_s)


def _draw_batch(run: _DecoderRun, prog: _DecoderProgress) -> tuple[Pairs, torch.Tensor]:
    """This step's training pairs and each row's site index [batch_size]: one weighted site, or one per input."""
    cfg = run.cfg
    if cfg.mixed_sites:
        return prog.source.mixed(run.sites, prog.weights, cfg.batch_size)
    i = prog.site_rng.choices(range(len(run.sites)), weights=prog.weights)[0]
    return prog.source.batch(run.sites[i], cfg.batch_size), torch.full((cfg.batch_size,), i)


def _train_step(run: _DecoderRun, prog: _DecoderProgress) -> None:
    """One optimisation step on a fresh batch at the scheduled rate; advances step, loss EMA and training time."""
    cfg, device = run.cfg, run.device
    t0 = time.perf_counter()
    pairs, site_idx = _draw_batch(run, prog)
    budget_s = run.budget_s
    frac = prog.step / cfg.steps if budget_s is None else max(prog.step / cfg.steps, prog.train_s / budget_s)
    for g in run.opt.param_groups:
        g["lr"] = cfg.lr * _lr_factor(frac, prog.step, cfg)
    ids = pairs.ids.to(device)  # [batch, seq_len]
    run.opt.zero_grad(set_to_none=True)
    lv = backward_by_length(run.model, ids, pairs.acts.to(device), site_idx.to(device), run.pad_id,
                            cfg.length_groups, cfg.compile)
    torch.nn.utils.clip_grad_norm_(run.dec.parameters(), 1.0)
    run.opt.step()
    prog.step += 1
    prog.ema = lv if prog.ema is None else 0.98 * prog.ema + 0.02 * lv
    if run.world > 1:  # every rank must agree on when the budget runs out
        t = torch.tensor([time.perf_counter() - t0], device=run.reduce_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        prog.train_s += float(t)
    else:
        prog.train_s += time.perf_counter() - t0


def _postfix(prog: _DecoderProgress) -> str:
    """The progress bar's loss and per-site hit rates."""
    return f"loss={prog.ema:.3f} hit=" + "/".join(f"{h:.2f}" for h in prog.hits)


def _train_loop(run: _DecoderRun, prog: _DecoderProgress, bar: tqdm) -> None:
    """Step until done, estimating every ``eval_every`` steps and checkpointing; Ctrl-C saves and says how to resume."""
    cfg = run.cfg
    try:
        while not _done(run, prog):
            _train_step(run, prog)
            bar.update(1)
            if prog.step % cfg.eval_every == 0 or _done(run, prog):
                _estimate(run, prog)
                bar.set_postfix_str(_postfix(prog))
            elif prog.step % 10 == 0:
                bar.set_postfix_str(_postfix(prog))
            if prog.step % cfg.checkpoint_every == 0 and not _done(run, prog):
                _save_state(run, prog)
    except KeyboardInterrupt:
        _save_state(run, prog)
        bar.close()
        raise CircuitkitError(f"interrupted at step {prog.step}; rerun the same command to resume from "
                              f"{run.partial}") from None
    bar.close()


def _finish(run: _DecoderRun, prog: _DecoderProgress, out: Path) -> dict:
    """The run's metrics; rank 0 also runs the final evaluation, writes ``out`` and removes the partial state."""
    cfg, dec, probed = run.cfg, run.dec, run.probed
    metrics: dict = {"steps": prog.step, "train_minutes": round(prog.train_s / 60, 3), "final_loss": prog.ema,
                     "world_size": run.world, "torch_threads": torch.get_num_threads(),
                     "resumed_from_step": prog.resumed_from}
    if run.rank == 0:
        dec.eval()
        if cfg.final_eval_queries > 0:
            metrics["eval"] = evaluate_decoder(dec, probed, run.sites, n_queries=cfg.final_eval_queries,
                                               n_per_cell=cfg.final_eval_per_cell)
        with atomic_dir(out) as tmp:
            save_decoder(tmp, dec, probed, run.sites, {"train_config": dataclasses.asdict(cfg)})
            atomic_write_json(tmp / "metrics.json", metrics)
            atomic_write_json(tmp / "train_history.json", prog.history)
            write_manifest(tmp, "inversion_decoder", cfg.seed, dataclasses.asdict(cfg),
                           probed_model=str(probed.path) if probed.path else None,
                           steps_taken=prog.step, stopped_by="steps" if prog.step >= cfg.steps else "minutes")
        shutil.rmtree(run.partial, ignore_errors=True)
    return metrics


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
    _check_and_place(probed, out, cfg, device)
    sites = list(sites or decoder_sites(probed))
    partial = Path(partial) if partial is not None else out.with_name(out.name + ".partial")
    dec = build_for(probed, sites, cfg).to(device)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    prog = _DecoderProgress(source=PairSource(probed, "train", seed=cfg.seed + 1000 * rank),
                            site_rng=random.Random(cfg.seed), hits=[0.0] * len(sites))
    run = _DecoderRun(probed=probed, cfg=cfg, sites=sites, dec=dec, model=dec, opt=opt, device=device, rank=rank,
                      world=world, partial=partial, state_file=partial / "train_state.pt", on_eval=on_eval,
                      pad_id=probed.task.vocab.pad_id)
    _resume(run, prog)
    run = dataclasses.replace(run, model=_wrap_model(run))
    prog.weights = site_weights(prog.hits, cfg.rebalance_floor)
    bar = tqdm(total=cfg.steps, initial=prog.step, desc="decoder", disable=not progress or rank != 0, unit="step")
    run.model.train()
    _train_loop(run, prog, bar)
    metrics = _finish(run, prog, out)
    if world > 1:
        dist.barrier()
    if _keep is not None:
        _keep["decoder"] = dec
    return {"history": prog.history, **metrics}
