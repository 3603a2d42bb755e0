"""Random-weight probed models of any shape, for tests that compare two computations of one quantity."""
from __future__ import annotations

import torch

from circuitkit.models.checkpoint import ProbedModel
from circuitkit.models.train import TrainConfig, build_model
from circuitkit.tasks import get_task

#: GPT-2 with 1, 2 and 3 layers, a parallel-residual NeoX and a gated, grouped-query Llama
SHAPES = [dict(n_layer=1, n_head=2, d_model=32), dict(n_layer=2, n_head=4, d_model=32),
          dict(n_layer=3, n_head=2, d_model=32), dict(arch="gpt_neox", n_layer=3, n_head=2, d_model=32),
          dict(arch="llama", n_layer=3, n_head=4, n_kv_head=2, d_model=32)]


def random_model(task_name: str, std: float = 0.2, **kw) -> ProbedModel:
    """A random-weight model of the given shape (std 0.2, so that patches move the output visibly)."""
    task = get_task(task_name)
    torch.manual_seed(0)
    model = build_model(task, TrainConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return ProbedModel(model, task)
