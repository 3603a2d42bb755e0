"""TransformerLens-native models (``circuitkit.models.native``): no LayerNorm, d_head of its own, an output
vocabulary of its own and bidirectional attention, run by the same runner and checked against TransformerLens's
own native bridge over the same weights."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

from circuitkit.errors import CircuitkitError
from circuitkit.models.checkpoint import load_probed
from circuitkit.models.native import NativeConfig, NativeTransformer, load_native, save_native, tl_bridge
from circuitkit.models.runner import ModelRunner
from circuitkit.models.train import random_init_like
from circuitkit.patching.metrics import evaluate
from circuitkit.patching.sweep import sweep
from circuitkit.tasks.registry import load_task


def _model(attention_dir: str, seed: int = 0, **sizes) -> NativeTransformer:
    torch.manual_seed(seed)
    shape = dict(n_layers=2, d_model=16, n_heads=2, d_head=5, d_mlp=12, d_vocab=7, d_vocab_out=4, n_ctx=6)
    return NativeTransformer(NativeConfig(**{**shape, **sizes}, attention_dir=attention_dir, initializer_range=0.3))


@pytest.mark.parametrize("attention_dir", ["bidirectional", "causal"])
@torch.no_grad()
def test_runner_equals_transformer_lens_native(attention_dir):
    m = _model(attention_dir)
    x = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(1))
    ours = ModelRunner(m).logits(x)
    assert ours.shape == (4, 6, 4)  # the output vocabulary, not the input's
    assert torch.allclose(ours, tl_bridge(m)(x), atol=1e-5)


@torch.no_grad()
def test_bidirectional_attention_reads_later_positions():
    """The same weights give other outputs when causal: the runner's one mask honours attention_dir."""
    bi, causal = _model("bidirectional", n_layers=1), _model("causal", n_layers=1)
    x = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(2))
    a, b = ModelRunner(bi).logits(x), ModelRunner(causal).logits(x)
    assert torch.allclose(a[:, -1], b[:, -1], atol=1e-5)  # one block: the last position sees everything either way
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-3)


def test_save_load_and_clear_errors(tmp_path):
    m = _model("bidirectional")
    save_native(m, tmp_path / "m")
    back = load_native(tmp_path / "m")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "attention_dir": "sideways"}))
    with pytest.raises(CircuitkitError, match="attention_dir 'sideways' is not one of.*bidirectional"):
        load_native(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "d_head": 6}))
    with pytest.raises(CircuitkitError, match=r"blocks.0.attn.q.weight has shape \(10, 16\), the config needs"):
        load_native(tmp_path / "m")
    with pytest.raises(CircuitkitError, match="only null"):
        NativeConfig.from_dict({**cfg, "normalization_type": "LN"})
    with pytest.raises(CircuitkitError, match="unknown field.*'n_layer'"):
        NativeConfig.from_dict({**cfg, "n_layer": 2})


@pytest.fixture(scope="module")
def native_counting(tmp_path_factory):
    """A random bidirectional native model over the counting task's vocabulary, loaded as a probed model."""
    task = load_task("counting")
    n = len(task.vocab)
    m = _model("bidirectional", seed=3, d_vocab=n, d_vocab_out=n, n_ctx=task.seq_len, n_heads=2)
    d = tmp_path_factory.mktemp("native") / "counting_bidirectional"
    save_native(m, d)
    return load_probed(d, task=task)


def test_a_native_checkpoint_is_a_probed_model_with_a_null_control(native_counting):
    pm = native_counting
    assert pm.runner.arch.family == "native" and not pm.runner.arch.causal
    fresh = random_init_like(pm, seed=1)
    assert isinstance(fresh.hf_model, NativeTransformer) and fresh.runner.arch.causal is False
    assert not torch.equal(fresh.hf_model.embed.weight, pm.hf_model.embed.weight)


@torch.no_grad()
def test_head_sweep_on_a_bidirectional_model_equals_transformer_lens(native_counting):
    """Cells *after* the answer position change the answer in a bidirectional model: the sweep must run them
    (a causal model's shortcut would leave them at the unpatched value)."""
    pm, task = native_counting, native_counting.task
    rng = random.Random(0)
    base = task.generate(rng, 6)
    src = [task.contrast_random(t, rng) for t in base]
    ours = sweep(pm, base, "head", source=src, progress=False, metric="logit")
    bids, sids = task.encode(base), task.encode(src)
    answer = int(ours.context.positions.max())
    bridge = pm.bridge()
    _, src_cache = bridge.run_with_cache(sids)
    rows = [(L, p, h) for L in range(pm.n_layers) for p in (1, answer, answer + 1) for h in range(pm.n_heads)]
    df = pd.DataFrame(rows, columns=["layer", "pos", "head"])

    def metric(logits):
        return evaluate("logit", logits, ours.context)[0]
    tl = tlp.get_act_patch_attn_head_out_by_pos(bridge, bids, src_cache, metric, index_axis_names=None,
                                                index_df=df, reduce="none")
    got = torch.stack([ours.values[L, p, h] for L, p, h in rows])
    assert (got - tl.values).abs().max() <= 1e-4  # [cell, example]
    after = [i for i, (_, p, _) in enumerate(rows) if p > answer]
    assert (got[after] - ours.base).abs().max() > 1e-4  # a later position did matter
