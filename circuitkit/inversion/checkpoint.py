"""Decoder checkpoints: weights + the probed model's identity (path and weight hash) + the sites.

A decoder directory holds ``decoder.pt`` (config and state dict), ``decoder.json`` (probed model
path, sha256 of its weights, task, sites, activation width) and ``manifest.json``.  Loading it
against a probed model whose weights hash differently is an error: the decoder would propose
inputs for activations it has never seen.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.inversion.decoder import DecoderConfig, InversionDecoder
from circuitkit.io_utils import atomic_torch_save, atomic_write_json, safe_torch_load
from circuitkit.models.checkpoint import ProbedModel, load_probed
from circuitkit.sites import Site, parse_site
from circuitkit.tasks.registry import task_from_record, task_record
from circuitkit.validate import check_weight_dir, read_json

WEIGHTS = "decoder.pt"
META = "decoder.json"


def model_hash(model: ProbedModel) -> str:
    """sha256 over the probed model's parameters (names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.hf_model.state_dict().items()):
        if name.endswith(".attn.bias") or name.endswith("masked_bias"):
            continue  # buffers, not weights
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class TrainedDecoder:
    """A decoder with the probed model it decodes and the sites it was trained on."""

    decoder: InversionDecoder
    probed: ProbedModel
    sites: list[Site]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def site_index(self, site: Site | str) -> int:
        s = parse_site(site) if isinstance(site, str) else site
        node = s.at(None)
        if node not in self.sites:
            raise CircuitkitError(
                f"the decoder was not trained on site {s.node!r}; trained sites: {choices_hint(x.node for x in self.sites)}"
            )
        return self.sites.index(node)

    def check_activation(self, act: torch.Tensor) -> None:
        d = self.decoder.cfg.act_dim
        if act.shape[-1] != d:
            raise CircuitkitError(f"activation has width {act.shape[-1]} but the decoder expects {d}")
        if not torch.isfinite(act).all():
            raise CircuitkitError("activation contains NaN or infinite values")


def save_decoder(out: str | Path, decoder: InversionDecoder, probed: ProbedModel, sites: list[Site],
                 extra: dict | None = None) -> None:
    out = Path(out)
    raw = decoder.module if hasattr(decoder, "module") else decoder
    atomic_torch_save({"config": raw.cfg.to_dict(), "state_dict": raw.state_dict()}, out / WEIGHTS)
    atomic_write_json(out / META, {
        "probed_model": str(probed.path.resolve()) if probed.path else None,
        "probed_sha256": model_hash(probed),
        "task": probed.task.name,
        "task_ref": task_record(probed.task),  # reloads a plug-in task through the trusted path
        "sites": [s.node for s in sites],
        "act_dim": raw.cfg.act_dim,
        **(extra or {}),
    })


def read_decoder_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CircuitkitError(f"decoder directory {str(path)!r} does not exist; train one with "
                              f"'circuitkit decoder train MODEL --out {path}'")
    if not (path / META).exists() or not (path / WEIGHTS).exists():
        raise CircuitkitError(f"{str(path)!r} is not a decoder directory (needs {WEIGHTS} and {META})")
    return read_json(path / META, "decoder metadata")


def load_decoder(path: str | Path, probed: ProbedModel | str | Path | None = None, device: str = "cpu") -> TrainedDecoder:
    """Load a decoder and its probed model (from the stored path unless given); checks identity."""
    path = Path(path)
    meta = read_decoder_meta(path)
    if probed is None:
        if not meta.get("probed_model"):
            raise CircuitkitError(f"{str(path)!r} does not record its probed model; pass it explicitly")
        probed = meta["probed_model"]
        if not Path(probed).is_absolute() and (path / probed).exists():
            probed = path / probed  # a committed decoder names its model relative to itself
    if not isinstance(probed, ProbedModel):
        task = task_from_record(meta.get("task_ref"), meta.get("task"), str(path), model_dir=probed)
        probed = load_probed(probed, task=task, device=device)
    digest = model_hash(probed)
    if digest != meta["probed_sha256"]:
        raise CircuitkitError(
            f"decoder {str(path)!r} was trained on a different probed model ({meta.get('probed_model')}, "
            f"weights sha256 {meta['probed_sha256'][:12]}…) than the one given "
            f"({probed.path}, sha256 {digest[:12]}…); train a decoder for this model"
        )
    state = safe_torch_load(path / WEIGHTS, "decoder weights", map_location=device)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or not isinstance(
            state.get("state_dict"), dict):
        raise CircuitkitError(f"{str(path / WEIGHTS)!r} is not a circuitkit decoder (expected a dict with 'config' "
                              "and 'state_dict'); retrain it with 'circuitkit decoder train'")
    try:
        dec = InversionDecoder(DecoderConfig(**state["config"]))
        dec.load_state_dict(state["state_dict"])
    except (TypeError, RuntimeError) as e:
        raise CircuitkitError(f"decoder {str(path)!r} does not match its own config: "
                              f"{str(e).splitlines()[0][:200]}") from None
    dec.to(device).eval()
    sites = [parse_site(s) for s in meta["sites"]]
    return TrainedDecoder(dec, probed, sites, meta, path)


def load_checked_decoder(decoder_dir: str | Path, model: str | Path | None = None,
                         device: str = "cpu") -> TrainedDecoder:
    """``load_decoder`` after checks that read no pickle: the directory exists, ``decoder.json`` is
    UTF-8 JSON, and every tensor file is whole and matches manifest.json's checksums, so a truncated or
    garbage file is named as such instead of failing deep inside torch."""
    check_decoder_dir(decoder_dir)
    return load_decoder(decoder_dir, probed=model, device=device)


def check_decoder_dir(decoder_dir: str | Path) -> None:
    """The pre-load checks of ``load_checked_decoder`` (also used by ``run --decoder``)."""
    path = Path(decoder_dir)
    if str(decoder_dir).strip() == "":
        raise CircuitkitError("the decoder directory is empty; give the --out of 'circuitkit decoder train'")
    if (path / META).is_file():
        read_json(path / META, "decoder metadata")
    read_decoder_meta(path)  # existence and layout, with the loader's own messages
    try:
        check_weight_dir(path)
    except CircuitkitError as e:
        raise CircuitkitError(f"refusing to load the decoder in {str(path)!r}: {e}") from None
