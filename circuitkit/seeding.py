"""One place to seed every random number generator circuitkit uses."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> random.Random:
    """Seed Python, NumPy and torch; return a ``random.Random`` for task data generation."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return random.Random(seed)
