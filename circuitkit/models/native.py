"""TransformerLens-native models: a directory of ``config.json`` + ``model.safetensors`` that no Hugging Face
class describes (tracr-compiled programs, toy models written by hand), run by the same ``ModelRunner``.

``config.json`` (``"model_type": "circuitkit_native"``) holds TransformerLens's own field names:

================  ==============================================  ==========================
field             meaning                                         values
================  ==============================================  ==========================
n_layers          blocks                                          >= 1
d_model           residual stream width                           >= 1
n_heads, d_head   heads per block and their width (independent)   >= 1
d_mlp             MLP hidden width                                >= 1
d_vocab           input tokens                                    >= 2
d_vocab_out       output units (tracr: the program's output set)  >= 1
n_ctx             positions                                       >= 1
act_fn            MLP activation                                  relu, gelu, gelu_new, silu
normalization_type                                                null (no LayerNorm)
attention_dir     who a position attends to                       causal, bidirectional
output            what the output units are                       categorical (one per value), numerical (one value, or its nearest-value readout)
================  ==============================================  ==========================

The weights use the names and shapes of TransformerLens's native bridge (``embed.weight``, ``pos_embed.weight``,
``blocks.L.attn.{q,k,v}.weight`` [n_heads * d_head, d_model] head-major, ``blocks.L.attn.o.weight``,
``blocks.L.mlp.{in,out}.weight``, ``unembed.weight`` [d_vocab_out, d_model], each with its ``bias``), so the same
file loads there too.  Loading reads safetensors only (never a pickle) and refuses a missing, extra or
misshapen tensor by name.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from circuitkit.errors import CircuitkitError, choices_hint

MODEL_TYPE = "circuitkit_native"
ATTENTION_DIRS = ("causal", "bidirectional")
OUTPUTS = ("categorical", "numerical")
ACT_FNS = ("relu", "gelu", "gelu_new", "silu")


@dataclass
class NativeConfig:
    """The sizes and wiring of a native model (the module table); also answers the few HF config questions the
    rest of circuitkit asks (``vocab_size``, ``n_positions``, ``to_dict`` / ``from_dict``)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    act_fn: str = "relu"
    normalization_type: str | None = None
    attention_dir: str = "causal"
    output: str = "categorical"
    initializer_range: float = 0.02
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        problems = [f"{f} must be a positive integer, got {getattr(self, f)!r}" for f in
                    ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx")
                    if not isinstance(getattr(self, f), int) or isinstance(getattr(self, f), bool)
                    or getattr(self, f) < 1]
        for name, value, valid in (("act_fn", self.act_fn, ACT_FNS), ("attention_dir", self.attention_dir,
                                   ATTENTION_DIRS), ("output", self.output, OUTPUTS)):
            if value not in valid:
                problems.append(f"{name} {value!r} is not one of {choices_hint(valid)}")
        if self.normalization_type is not None:
            problems.append(f"normalization_type {self.normalization_type!r}: only null (no LayerNorm) is supported")
        if problems:
            raise CircuitkitError("native model config: " + "; ".join(problems))

    @property
    def vocab_size(self) -> int:
        return self.d_vocab

    @property
    def n_positions(self) -> int:
        return self.n_ctx

    @property
    def causal(self) -> bool:
        return self.attention_dir == "causal"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NativeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CircuitkitError(f"native model config: unknown field(s) {unknown}; valid: {', '.join(sorted(known))}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise CircuitkitError(f"native model config: missing field(s) {missing}")
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise CircuitkitError(f"native model config: model_type must be {MODEL_TYPE!r}")
        return cls(**d)


class _Block(nn.Module):
    def __init__(self, c: NativeConfig) -> None:
        super().__init__()
        hd = c.n_heads * c.d_head
        self.attn = nn.ModuleDict({"q": nn.Linear(c.d_model, hd), "k": nn.Linear(c.d_model, hd),
                                   "v": nn.Linear(c.d_model, hd), "o": nn.Linear(hd, c.d_model)})
        self.mlp = nn.ModuleDict({"in": nn.Linear(c.d_model, c.d_mlp), "out": nn.Linear(c.d_mlp, c.d_model)})


class NativeTransformer(nn.Module):
    """The parameters of a native model (no forward of its own: ``ModelRunner`` runs it); constructed from a
    config it is randomly initialised (normal, ``initializer_range``; biases zero), as the null control needs."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.d_vocab, config.d_model)
        self.pos_embed = nn.Embedding(config.n_ctx, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.unembed = nn.Linear(config.d_model, config.d_vocab_out)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=config.initializer_range)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Outputs [batch, pos, d_vocab_out] (through the runner, so there is one forward pass)."""
        from circuitkit.models.runner import ModelRunner

        return ModelRunner(self).logits(input_ids)


def tl_bridge(model: NativeTransformer, device: str = "cpu") -> Any:
    """TransformerLens's own native bridge over the same weights (the reference the tests compare with)."""
    from transformer_lens.model_bridge.sources import boot_native

    c = model.config
    bridge = boot_native({k: getattr(c, k) for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab",
                                                     "d_vocab_out", "n_ctx", "act_fn", "normalization_type",
                                                     "attention_dir")}, device=device)
    result = bridge.load_state_dict(model.state_dict(), strict=False)
    ours = set(model.state_dict())
    if ours & set(result.unexpected_keys) or any(k in ours for k in result.missing_keys):
        raise CircuitkitError(f"TransformerLens's native layout differs from circuitkit's: missing "
                              f"{sorted(ours & set(result.missing_keys))}, unexpected {sorted(result.unexpected_keys)}")
    return bridge.eval()


def is_native_dir(path: Path) -> bool:
    """Whether ``path/config.json`` describes a native model."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def save_native(model: NativeTransformer, out_dir: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (each atomically)."""
    from safetensors.torch import save_file

    from circuitkit.io_utils import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", model.config.to_dict())
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")


def load_native(path: str | Path, device: str = "cpu") -> NativeTransformer:
    """The native model in ``path``; a bad config or weights file is named with what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = NativeConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise CircuitkitError(f"cannot read {str(path / 'config.json')!r}: {e}") from None
    if not (path / "model.safetensors").is_file():
        raise CircuitkitError(f"{str(path)!r} has no model.safetensors (a native model's weights)")
    try:
        state = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CircuitkitError(f"cannot read {str(path / 'model.safetensors')!r}: {e}") from None
    model = NativeTransformer(config)
    _check_state(model, state, path)
    model.load_state_dict(state)
    return model.to(device).eval()


def _check_state(model: NativeTransformer, state: dict[str, Tensor], path: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if sorted(set(want) - set(have)):
        problems.append(f"missing {sorted(set(want) - set(have))}")
    if sorted(set(have) - set(want)):
        problems.append(f"unexpected {sorted(set(have) - set(want))}")
    problems += [f"{k} has shape {have[k]}, the config needs {want[k]}" for k in want if k in have and have[k] != want[k]]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    problems += [f"{k} holds NaN or infinite values" for k in bad]
    if problems:
        raise CircuitkitError(f"the weights in {str(path)!r} do not match its config.json: " + "; ".join(problems))


__all__ = ["ATTENTION_DIRS", "MODEL_TYPE", "NativeConfig", "NativeTransformer", "OUTPUTS", "is_native_dir",
           "load_native", "save_native", "tl_bridge"]
