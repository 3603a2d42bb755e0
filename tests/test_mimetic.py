"""Mimetic attention initialisation: the weight structure it promises and what it does to attention."""
from __future__ import annotations

import pytest
import torch

from circuitkit.errors import CircuitkitError
from circuitkit.models.mimetic import MIMETIC_QK, MIMETIC_VO
from circuitkit.models.train import TrainConfig, build_model, default_config
from circuitkit.tasks import get_task


def _products(model: torch.nn.Module, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_Q W_K^T, W_V W_O) of one head, each [d, d]."""
    attn = model.transformer.h[layer].attn
    d = attn.c_proj.weight.shape[0]
    dh = d // model.config.n_head
    cols = slice(head * dh, (head + 1) * dh)
    w = attn.c_attn.weight.detach()
    wq, wk, wv = w[:, :d][:, cols], w[:, d:2 * d][:, cols], w[:, 2 * d:][:, cols]
    return wq @ wk.T, wv @ attn.c_proj.weight.detach()[cols, :]


def test_one_head_products_are_identity_plus_noise():
    task = get_task("counting")
    model = build_model(task, TrainConfig(n_layer=2, n_head=1, d_model=64, attn_init="mimetic"))
    d = 64
    for layer in range(2):
        qk, vo = _products(model, layer, 0)
        off = ~torch.eye(d, dtype=torch.bool)
        assert abs(float(qk.diagonal().mean()) - MIMETIC_QK[1]) < 0.05
        assert abs(float(vo.diagonal().mean()) + MIMETIC_VO[1]) < 0.05
        assert abs(float(qk[off].std()) * d**0.5 - MIMETIC_QK[0]) < 0.1  # Z has entries N(0, 1/d)
        assert abs(float(vo[off].std()) * d**0.5 - MIMETIC_VO[0]) < 0.1


def test_multi_head_products_have_the_head_rank_and_a_positive_diagonal():
    model = build_model(get_task("addition"), TrainConfig(n_layer=2, n_head=4, d_model=32, attn_init="mimetic"))
    normal = build_model(get_task("addition"), TrainConfig(n_layer=2, n_head=4, d_model=32))
    for head in range(4):
        qk, vo = _products(model, 0, head)
        assert int(torch.linalg.matrix_rank(qk)) == 8
        assert float(qk.diagonal().mean()) > 0.1 and float(vo.diagonal().mean()) < -0.05
        assert abs(float(_products(normal, 0, head)[0].diagonal().mean())) < 0.01


def test_mimetic_layer_0_attends_to_the_same_letter_at_initialisation():
    """From the query letter, a fresh mimetic model puts more attention on that letter's occurrences
    than a GPT-2-initialised one (uniform attention gives about a third)."""
    task = get_task("counting")
    texts = list(task.split("test")[:300])
    ids = task.encode(texts)  # [batch, pos]

    def same_letter_share(cfg: TrainConfig) -> float:
        torch.manual_seed(cfg.seed)  # the GPT-2 init draws from the global generator
        model = build_model(task, cfg).eval()
        model.set_attn_implementation("eager")
        with torch.no_grad():
            att = model(input_ids=ids, output_attentions=True).attentions[0][:, 0]  # [batch, query, key]
        q = (ids == task.vocab.id_of(":")).int().argmax(dim=1) - 1  # the query letter's position
        rows = att[torch.arange(len(ids)), q]  # [batch, key]
        same = ids == ids[torch.arange(len(ids)), q][:, None]
        same &= torch.arange(ids.shape[1])[None, :] <= q[:, None]
        return float((rows * same).sum(dim=1).mean())

    base = dict(n_layer=2, n_head=1, d_model=64, init_std=0.02)
    mimetic = same_letter_share(TrainConfig(**base, attn_init="mimetic"))
    normal = same_letter_share(TrainConfig(**base))
    print(f"same-letter share at init: mimetic {mimetic:.3f}, normal {normal:.3f}")
    assert mimetic > normal + 0.1, (mimetic, normal)


def test_same_seed_same_weights_and_unknown_init_rejected():
    task = get_task("counting")
    a = build_model(task, TrainConfig(attn_init="mimetic", seed=3)).state_dict()
    b = build_model(task, TrainConfig(attn_init="mimetic", seed=3)).state_dict()
    c = build_model(task, TrainConfig(attn_init="mimetic", seed=4)).state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    with pytest.raises(CircuitkitError, match="unknown attention init 'xavier'; valid: normal, mimetic"):
        default_config(task).replace(attn_init="xavier")
    with pytest.raises(CircuitkitError, match="unknown attention init"):
        TrainConfig(attn_init="xavier")
