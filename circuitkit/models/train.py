"""Train a probed model (an HF GPT-2, GPT-NeoX or Llama causal LM) on a task, on the CPU, with resume.

Training state lives in ``<out>.partial/`` while the run is in progress (checkpointed every
``checkpoint_every`` steps and on Ctrl-C); a rerun of the same command resumes from it.  The
finished checkpoint (HF files, ``circuitkit.json``, ``metrics.json``, ``manifest.json``) appears
in ``<out>/`` at once, by rename, and the partial state is removed.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.io_utils import atomic_dir, atomic_torch_save, atomic_write_json, safe_torch_load
from circuitkit.manifest import write_manifest
from circuitkit.models.checkpoint import ProbedModel, quiet_transformers, save_probed
from circuitkit.models.evaluate import evaluate_model
from circuitkit.models.mimetic import mimetic_attention_init
from circuitkit.models.runner import ModelRunner
from circuitkit.seeding import seed_everything
from circuitkit.tasks.base import Task


@dataclass
class TrainConfig:
    """Architecture and optimisation of a probed model."""

    arch: str = "gpt2"  # block family (ARCHS): gpt2; gpt_neox (parallel residual, rotary); llama (RMSNorm,
    #                     rotary, gated MLP, grouped-query attention with n_kv_head)
    n_layer: int = 2
    n_head: int = 1
    n_kv_head: int | None = None  # llama only: key/value heads (default n_head: no grouping)
    d_model: int = 64
    activation: str | None = None  # default per family (ARCH_ACTIVATION): GPT-2's gelu_new, NeoX's gelu, SiLU
    init_std: float = 0.02  # std of the initial weights (HF GPT-2 ``initializer_range``)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    steps: int = 6000
    warmup: int = 200
    min_lr_ratio: float = 0.05
    checkpoint_every: int = 500
    eval_limit: int = 20000
    seed: int = 0
    threads: int | None = None
    bucket_by_length: bool = True  # same-length batches with padding trimmed (faster); False = uniform batches
    init_from: str | None = None  # continue from this checkpoint's weights (same architecture), fresh schedule
    attn_init: str = "normal"  # "normal" (GPT-2's) or "mimetic" (W_Q W_K^T ~ I, W_V W_O ~ -I; models/mimetic.py)

    def __post_init__(self) -> None:
        if self.attn_init not in ATTN_INITS:
            raise CircuitkitError(f"unknown attention init {self.attn_init!r}; valid: {', '.join(ATTN_INITS)}")
        if self.arch not in ARCHS:
            raise CircuitkitError(f"unknown architecture {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.attn_init == "mimetic" and self.arch != "gpt2":
            raise CircuitkitError(f"the mimetic attention init is written for GPT-2 blocks; with --arch {self.arch} "
                                  "use --attn-init normal")
        if self.n_kv_head is not None:
            if self.arch != "llama":
                raise CircuitkitError(f"key/value heads (--kv-heads) are a llama option; --arch is {self.arch}")
            if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
                raise CircuitkitError(f"--kv-heads {self.n_kv_head} must be a positive divisor of --heads "
                                      f"{self.n_head}")

    @property
    def act(self) -> str:
        """The MLP's activation: the configured one, else the family's (``ARCH_ACTIVATION``)."""
        return self.activation or ARCH_ACTIVATION[self.arch]

    def replace(self, **kw: Any) -> TrainConfig:
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise CircuitkitError(f"unknown training options {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


#: initialisations of the attention weights ``TrainConfig.attn_init`` accepts
ATTN_INITS = ("normal", "mimetic")
#: block families ``TrainConfig.arch`` builds, and each one's default MLP activation
ARCH_ACTIVATION = {"gpt2": "gelu_new", "gpt_neox": "gelu", "llama": "silu"}
ARCHS = tuple(ARCH_ACTIVATION)


def default_config(task: Task) -> TrainConfig:
    """The task's own model recipe (``Task.model_recipe``) over the generic TrainConfig defaults."""
    recipe = dict(task.model_recipe)
    unknown = sorted(set(recipe) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CircuitkitError(f"task {task.name!r} model_recipe has unknown training options {unknown}; valid: "
                              f"{choices_hint([f.name for f in dataclasses.fields(TrainConfig)], 30)}")
    return dataclasses.replace(TrainConfig(), **recipe)


def build_model(task: Task, cfg: TrainConfig) -> torch.nn.Module:
    """A fresh causal LM of the family ``cfg.arch`` shaped for the task (no dropout, the paper's setting;
    MLP width 4·d_model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    quiet_transformers()

    if cfg.d_model % cfg.n_head:
        raise CircuitkitError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
    ids = dict(bos_token_id=task.vocab.bos_id, eos_token_id=task.vocab.eos_id, pad_token_id=task.vocab.pad_id)
    if cfg.arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(task.vocab), n_positions=task.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, activation_function=cfg.act, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, initializer_range=cfg.init_std, **ids))
        if cfg.attn_init == "mimetic":
            mimetic_attention_init(model, seed=cfg.seed)
        return model
    common = dict(vocab_size=len(task.vocab), hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.d_model, hidden_act=cfg.act,
                  max_position_embeddings=task.seq_len, initializer_range=cfg.init_std, **ids)
    if cfg.arch == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, use_parallel_residual=True, attention_dropout=0.0,
                                                hidden_dropout=0.0, tie_word_embeddings=False))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                                        attention_dropout=0.0, tie_word_embeddings=False))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token predictions at masked positions.

    logits: [batch, pos, vocab]; ids: [batch, pos]; mask: [batch, pos] (position predicts pos+1).
    """
    pred = logits[:, :-1][mask[:, :-1]]
    gold = ids[:, 1:][mask[:, :-1]]
    return F.cross_entropy(pred, gold)


class LengthBucketSampler:
    """Batches of same-length texts, buckets drawn in proportion to their size.

    Every example is still drawn uniformly over the split, but a batch holds texts of one
    length, so trimming its padding (``trim_padding``) saves the compute spent on PAD columns
    (a third of it for counting).
    """

    def __init__(self, texts: Sequence[str]) -> None:
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, t in enumerate(texts):
            buckets[len(t)].append(i)
        self.texts = texts
        self.buckets = [buckets[k] for k in sorted(buckets)]
        self.cum = list(itertools.accumulate(len(b) for b in self.buckets))

    def batch(self, rng: random.Random, size: int) -> list[str]:
        b = self.buckets[bisect.bisect_right(self.cum, rng.randrange(self.cum[-1]))]
        return [self.texts[b[rng.randrange(len(b))]] for _ in range(size)]


class UniformSampler:
    """Batches drawn uniformly from the split (mixed lengths)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts

    def batch(self, rng: random.Random, size: int) -> list[str]:
        return [self.texts[rng.randrange(len(self.texts))] for _ in range(size)]


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row. ids: [batch, pos]."""
    keep = int((ids != pad_id).any(dim=0).nonzero().max()) + 1
    return ids[:, :keep]


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, task: Task, ids: torch.Tensor, step: int,
               cfg: TrainConfig) -> float:
    """One optimisation step at the scheduled learning rate (clipped gradients); returns the loss. ids: [batch, pos]."""
    for g in opt.param_groups:
        g["lr"] = learning_rate_at(step, cfg)
    loss = lm_loss(model(input_ids=ids).logits, ids, task.loss_mask(ids))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@dataclass(frozen=True)
class _ProbedRun:
    """What one probed-model training run holds fixed: task, options, model, optimiser, data RNG and state file."""

    task: Task
    cfg: TrainConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    rng: random.Random  # draws the training batches; checkpointed as it was before an unfinished step
    partial: Path
    state_file: Path
    device: str


@dataclass
class _ProbedProgress:
    """What a probed-model training run changes as it goes: step, training seconds, loss history and EMA."""

    step: int = 0
    elapsed: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)
    ema: float | None = None


def _initial_model(task: Task, cfg: TrainConfig, device: str) -> torch.nn.Module:
    """A fresh model for the task on ``device``, with ``cfg.init_from``'s weights when given."""
    model = build_model(task, cfg).to(device)
    if cfg.init_from:
        from circuitkit.models.checkpoint import load_probed

        start = load_probed(cfg.init_from, task=task)
        try:
            model.load_state_dict(start.hf_model.state_dict())
        except RuntimeError as e:
            raise CircuitkitError(f"--init-from {cfg.init_from!r} has another architecture than the one requested: "
                                  f"{str(e).splitlines()[0]}") from None
    return model


def _resume(run: _ProbedRun, prog: _ProbedProgress) -> None:
    """Load an interrupted run's model, optimiser, progress and RNG states, when there is one."""
    if not run.state_file.exists():
        return
    state = safe_torch_load(run.state_file, "interrupted model training state", map_location=run.device)
    if state["config"] != dataclasses.asdict(run.cfg) or state["task"] != run.task.name:
        raise CircuitkitError(
            f"{str(run.partial)!r} holds an interrupted run with a different task or configuration; "
            f"delete it to start over, or rerun with the same options to resume"
        )
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    prog.step, prog.elapsed, prog.history = state["step"], state["elapsed"], state["history"]
    run.rng.setstate(state["py_rng"])
    torch.set_rng_state(state["torch_rng"])


def _save_state(run: _ProbedRun, prog: _ProbedProgress, py_rng_state: object) -> None:
    """Checkpoint the state *between* steps (the RNG as it was before the unfinished step)."""
    atomic_torch_save(
        {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "step": prog.step,
         "elapsed": prog.elapsed, "history": prog.history, "config": dataclasses.asdict(run.cfg),
         "task": run.task.name, "py_rng": py_rng_state, "torch_rng": torch.get_rng_state()},
        run.state_file,
    )


def _train_steps(run: _ProbedRun, prog: _ProbedProgress, sampler: LengthBucketSampler | UniformSampler,
                 bar: tqdm) -> None:
    """Train to ``cfg.steps``, logging and checkpointing; Ctrl-C saves the state and says how to resume."""
    cfg, task = run.cfg, run.task
    t0 = time.perf_counter()
    rng_before_step = run.rng.getstate()
    try:
        while prog.step < cfg.steps:
            rng_before_step = run.rng.getstate()
            # ids: [batch, pos], padding columns trimmed
            ids = trim_padding(task.encode(sampler.batch(run.rng, cfg.batch_size)), task.vocab.pad_id).to(run.device)
            loss = train_step(run.model, run.opt, task, ids, prog.step, cfg)
            prog.step += 1
            prog.ema = loss if prog.ema is None else 0.98 * prog.ema + 0.02 * loss
            bar.update(1)
            if prog.step % 50 == 0:
                bar.set_postfix(loss=f"{prog.ema:.4f}")
                prog.history.append({"step": prog.step, "loss": prog.ema})
            if prog.step % cfg.checkpoint_every == 0 and prog.step < cfg.steps:
                prog.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                _save_state(run, prog, run.rng.getstate())
    except KeyboardInterrupt:
        prog.elapsed += time.perf_counter() - t0
        _save_state(run, prog, rng_before_step)
        bar.close()
        raise CircuitkitError(f"interrupted at step {prog.step}; rerun the same command to resume from "
                              f"{run.partial}") from None
    bar.close()
    prog.elapsed += time.perf_counter() - t0


def train_probed(task: Task, out: str | Path, cfg: TrainConfig | None = None, progress: bool = True,
                 device: str = "cpu", partial: str | Path | None = None) -> dict:
    """Train, evaluate and write a checkpoint to ``out``; returns the metrics dict.

    ``partial``: where an interrupted run keeps its state (default ``<out>.partial``)."""
    cfg = cfg or default_config(task)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CircuitkitError(f"output directory {str(out)!r} exists and is not empty; choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    partial = Path(partial) if partial is not None else _partial_dir(out)
    rng = seed_everything(cfg.seed)
    model = _initial_model(task, cfg, device)
    run = _ProbedRun(task=task, cfg=cfg, model=model, opt=make_optimizer(model, cfg), rng=rng, partial=partial,
                     state_file=partial / "train_state.pt", device=device)
    prog = _ProbedProgress()
    _resume(run, prog)
    train = task.split("train")
    sampler = LengthBucketSampler(train) if cfg.bucket_by_length else UniformSampler(train)
    runner = ModelRunner(model)
    model.train()
    bar = tqdm(total=cfg.steps, initial=prog.step, desc=f"train {task.name}", disable=not progress, unit="step")
    _train_steps(run, prog, sampler, bar)
    model.eval()
    metrics = evaluate_model(runner, task, "test", limit=cfg.eval_limit, seed=cfg.seed, progress=progress)
    metrics.update({"train_wall_seconds": round(prog.elapsed, 1), "train_steps": prog.step,
                    "torch_threads": torch.get_num_threads(), "final_loss": prog.ema})
    write_trained(model, task, cfg, out, metrics, prog.history)
    shutil.rmtree(partial, ignore_errors=True)
    return metrics


def write_trained(model: torch.nn.Module, task: Task, cfg: TrainConfig, out: Path, metrics: dict,
                  history: list[dict], **manifest_extra: Any) -> None:
    """Write a finished probed model to ``out`` at once (HF files, metrics, history, manifest)."""
    with atomic_dir(out) as tmp:
        save_probed(model, task, tmp)
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "train_history.json", history)
        if cfg.init_from:
            src_man = Path(cfg.init_from) / "manifest.json"
            manifest_extra["init_from_manifest"] = json.loads(src_man.read_text()) if src_man.exists() else None
        write_manifest(tmp, "probed_model", cfg.seed, {"task": task.name, "task_ref": task.spec or task.name,
                                                        **dataclasses.asdict(cfg)}, **manifest_extra)


def as_probed(model: torch.nn.Module, task: Task, path: Path | None = None) -> ProbedModel:
    """Wrap an in-memory HF model (e.g. a freshly initialised null-control model)."""
    return ProbedModel(hf_model=model.eval(), task=task, path=path)


def random_init_like(probed: ProbedModel, seed: int = 0) -> ProbedModel:
    """A randomly initialised model with the same architecture and task: the null control."""
    torch.manual_seed(seed)
    fresh = type(probed.hf_model)(probed.hf_model.config).to(probed.device)  # same family as the probed model
    return as_probed(fresh, probed.task)


__all__ = ["TrainConfig", "default_config", "build_model", "lm_loss", "learning_rate_at", "make_optimizer",
           "train_step", "train_probed", "write_trained", "as_probed", "random_init_like"]
