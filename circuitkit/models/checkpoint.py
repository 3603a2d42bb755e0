"""Probed-model checkpoints: ordinary Hugging Face GPT-2, GPT-NeoX or Llama directories plus circuitkit metadata.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or the older
``pytorch_model.bin``), and when written by circuitkit also ``circuitkit.json`` (which task),
``metrics.json`` and ``manifest.json``.  The paper's own checkpoints load as they are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.io_utils import safe_torch_load
from circuitkit.models.architectures import SUPPORTED, architecture
from circuitkit.models.native import MODEL_TYPE, is_native_dir, load_native
from circuitkit.models.runner import ModelRunner
from circuitkit.tasks import Task
from circuitkit.tasks.registry import load_task, task_from_record, task_names, task_record
from circuitkit.validate import check_device, check_weight_dir, read_json

META_FILE = "circuitkit.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise CircuitkitError(
            f"checkpoint directory {str(path)!r} does not exist; train one with "
            f"'circuitkit model train TASK --out {path}' or put an HF GPT-2 checkpoint there "
            f"(config.json + model.safetensors or pytorch_model.bin)"
        )
    if not path.is_dir():
        raise CircuitkitError(f"{str(path)!r} is a file; a checkpoint is a directory with config.json and weights")
    if not (path / "config.json").exists():
        raise CircuitkitError(f"{str(path)!r} has no config.json; it is not a HuggingFace checkpoint directory")
    if not any((path / w).exists() for w in WEIGHT_FILES):
        raise CircuitkitError(f"{str(path)!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_meta(path: str | Path) -> dict[str, Any]:
    """``circuitkit.json`` of a checkpoint (which task, its vocabulary); {} when there is none."""
    f = Path(path) / META_FILE
    if not f.exists():
        return {}
    return read_json(f, "checkpoint metadata")


def quiet_transformers() -> None:
    """No download/loading progress bars or padding advice from transformers in our output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def read_architecture(path: str | Path) -> tuple[int, int]:
    """(layers, heads) of a checkpoint, from config.json alone: sites need no task and no weights."""
    path = Path(path)
    _check_dir(path)
    cfg = read_json(path / "config.json", "model config")
    layers = next((cfg[k] for k in ("n_layer", "num_hidden_layers", "num_layers", "n_layers") if k in cfg), None)
    heads = next((cfg[k] for k in ("n_head", "num_attention_heads", "num_heads", "n_heads") if k in cfg), None)
    for name, v in (("number of layers", layers), ("number of heads", heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CircuitkitError(f"{str(path / 'config.json')!r} does not give a positive {name} "
                                  "(n_layer / num_hidden_layers, n_head / num_attention_heads)")
    if cfg.get("model_type") == MODEL_TYPE:
        load_native(path)  # a native model's config and weights are checked as it loads
    elif cfg.get("model_type") in SUPPORTED:  # the weights must be the model config.json describes
        config = _read_config(path)
        check_weights_match_config(path, config)
    return layers, heads


#: config.json keys of each supported family that must be positive integers: (layers, heads, width, vocab, context)
_SIZE_KEYS = {"gpt2": ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"),
              "gpt_neox": ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size",
                           "max_position_embeddings"),
              "llama": ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size",
                        "max_position_embeddings")}


def _read_config(path: Path) -> Any:
    """The checkpoint's HF config, of a supported family, with sane sizes (``check_config``)."""
    quiet_transformers()
    from transformers import AutoConfig

    raw = read_json(path / "config.json", "model config")  # encoding and JSON errors named plainly
    family = raw.get("model_type") if isinstance(raw, dict) else None
    if family not in SUPPORTED:
        raise CircuitkitError(f"{str(path)!r} holds a {family!r} model; circuitkit probes {', '.join(SUPPORTED)} "
                              "checkpoints")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt checkpoint to the user
        raise CircuitkitError(f"cannot read {str(path / 'config.json')!r}: {e}") from None
    check_config(config, path)
    return config


def _load_hf(path: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if is_native_dir(path):  # a TransformerLens-native directory (no Hugging Face class describes it)
        return load_native(path, device)
    config = _read_config(path)
    try:
        check_weight_dir(path)
        check_weights_match_config(path, config)
    except CircuitkitError as e:
        raise CircuitkitError(f"cannot load the weights in {str(path)!r}: {e}") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                           output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise CircuitkitError(f"cannot load the weights in {str(path)!r} (corrupt or incomplete?): {e}") from None
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:  # transformers would initialise a missing tensor at random and only warn
        raise CircuitkitError(f"the weights in {str(path)!r} do not match its config.json: " + "; ".join(
            f"{k.replace('_', ' ')}: {_names([str(x) for x in v])}" for k, v in problems.items()))
    check_finite(model, path)
    architecture(model)  # wiring the runner cannot reproduce is refused here, by name
    return model.to(device).eval()


def check_config(config: Any, path: Path) -> None:
    """Sizes in config.json that no model can have (a hand edit gone wrong) are refused by name."""
    where = str(path / "config.json")
    keys = _SIZE_KEYS[config.model_type]
    for name in keys:
        v = getattr(config, name, None)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CircuitkitError(f"{where!r}: {name} must be a positive integer, got {v!r}")
    width, heads = getattr(config, keys[2]), getattr(config, keys[1])
    if width % heads and not getattr(config, "head_dim", None):
        raise CircuitkitError(f"{where!r}: {keys[2]} {width} is not divisible by {keys[1]} {heads}")


def context_length(config: Any) -> int:
    """How many positions the model takes (n_positions / max_position_embeddings)."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def _tensor_shapes(path: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The weights file of a checkpoint and its tensors' shapes, read without loading any pickle."""
    st = path / "model.safetensors"
    if st.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(st), "pt") as f:
                return st, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - the safetensors reader raises its own error types
            raise CircuitkitError(f"{str(st)!r} is corrupt or truncated ({e}); restore it or retrain") from None
    pt = path / "pytorch_model.bin"
    state = safe_torch_load(pt, "model weights")
    if not isinstance(state, dict):
        raise CircuitkitError(f"{str(pt)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return pt, {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _norm(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def check_weights_match_config(path: Path, config: Any) -> None:
    """The weights file holds exactly the tensors config.json describes, with their shapes (GPT-2, read from
    the file's header before loading; other families are checked by the loader's report, ``_load_hf``).

    transformers would otherwise initialise a missing layer at random (or drop an extra one) and only
    warn; a model that silently is not the one trained must never be probed.
    """
    if config.model_type != "gpt2":
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {_norm(k): tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    file, found = _tensor_shapes(path)
    present = {_norm(k): v for k, v in found.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    missing = sorted(set(expected) - set(present) - optional)
    extra = sorted(set(present) - set(expected))
    wrong = sorted(k for k in set(expected) & set(present) if expected[k] != present[k])
    if not (missing or extra or wrong):
        return
    dims = ", ".join(f"{k}={getattr(config, k)}" for k in _SIZE_KEYS[config.model_type][:4])
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if extra:
        parts.append(f"{len(extra)} extra tensor(s): {_names(extra)}")
    if wrong:
        parts.append(f"{len(wrong)} of the wrong shape: " + ", ".join(
            f"{k} is {list(present[k])}, config wants {list(expected[k])}" for k in wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
    raise CircuitkitError(f"{str(file)!r} does not match {str(path / 'config.json')!r} ({dims}): {'; '.join(parts)}; "
                          "the config was edited or belongs to another model")


def _names(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_finite(model: torch.nn.Module, path: Path) -> None:
    """NaN or infinite weights make every downstream number meaningless: refuse them by tensor name."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CircuitkitError(f"the weights in {str(path)!r} contain NaN or infinite values ({_names(bad)}); "
                              "the checkpoint is corrupt or diverged in training")


def check_vocab(task: Task, hf_model: torch.nn.Module, meta: dict[str, Any], where: str) -> None:
    """The checkpoint's vocabulary must be the task's, or every id means something else."""
    n = hf_model.config.vocab_size
    if n != len(task.vocab):
        raise CircuitkitError(
            f"checkpoint {where!r} has vocab_size {n} but task {task.name!r} has {len(task.vocab)} tokens; "
            f"pass the task it was trained on (--task {choices_hint(task_names())} or FILE.py:Class)"
        )
    stored = meta.get("task_spec", {}).get("vocab")
    if stored is not None and list(stored) != list(task.vocab.tokens):
        raise CircuitkitError(f"checkpoint {where!r} was trained with a different vocabulary than task {task.name!r}")
    n_pos = context_length(hf_model.config)
    if n_pos < task.seq_len:
        raise CircuitkitError(
            f"checkpoint {where!r} has n_positions {n_pos} < the task's sequence length {task.seq_len}"
        )


@dataclass
class ProbedModel:
    """A probed model: the HF module, the task it solves, and fast/reference ways to run it."""

    hf_model: torch.nn.Module
    task: Task
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def runner(self) -> ModelRunner:
        return ModelRunner(self.hf_model)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.runner.n_layers

    @property
    def n_heads(self) -> int:
        return self.runner.n_heads

    def bridge(self):
        """A TransformerLens ``TransformerBridge`` over the same weights (the reference path)."""
        from transformer_lens.model_bridge import TransformerBridge

        from circuitkit.models.native import NativeTransformer, tl_bridge

        if isinstance(self.hf_model, NativeTransformer):
            return tl_bridge(self.hf_model, str(self.device))
        if self.path is None:
            raise CircuitkitError("this model has no checkpoint directory; save it first to build a bridge")
        return TransformerBridge.boot_transformers(str(self.path), hf_model=self.hf_model, device=str(self.device))


def load_probed(path: str | Path, task: str | Task | None = None, device: str = "cpu",
                artefact: tuple[dict[str, Any], str] | None = None) -> ProbedModel:
    """Load a local HF GPT-2 checkpoint (safetensors or pytorch_model.bin) for ``task``.

    The task comes from the argument (a Task or a spec the user named, ``load_task``), else from the
    checkpoint's ``circuitkit.json`` (its recorded spec; see ``registry.task_from_record``), else from
    ``artefact`` = (metadata, path) of a file the user handed with the model (a decoder, hypotheses or
    verification JSON), for a model saved by other tools with no task of its own (a prompt-pairs model).
    """
    path = Path(path)
    _check_dir(path)
    meta = read_meta(path)
    if task is None and not meta.get("task") and not meta.get("task_ref") and artefact is not None and (
            artefact[0].get("task_ref") or artefact[0].get("task")):
        task_obj = task_from_record(artefact[0].get("task_ref"), artefact[0].get("task"), artefact[1], model_dir=path)
    elif task is None:
        task_obj = task_from_record(meta.get("task_ref"), meta.get("task"), str(path))
    else:
        task_obj = load_task(task, model_dir=path) if isinstance(task, str) else task
    device = check_device(device)
    hf_model = _load_hf(path, device)
    check_vocab(task_obj, hf_model, meta, str(path))
    return ProbedModel(hf_model=hf_model, task=task_obj, path=path, meta=meta)


def save_probed(model: torch.nn.Module, task: Task, out_dir: str | Path, extra_meta: dict | None = None) -> None:
    """Write an HF checkpoint (``save_pretrained``) plus ``circuitkit.json`` into ``out_dir``."""
    from circuitkit.io_utils import atomic_write_json

    out_dir = Path(out_dir)
    quiet_transformers()
    model.save_pretrained(out_dir)
    atomic_write_json(out_dir / META_FILE, {"task": task.name, "task_ref": task_record(task), "task_spec": task.describe(), **(extra_meta or {})})
