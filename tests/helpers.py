"""Plain helpers shared by test files (`from helpers import randomize`: tests/ is on sys.path through
tests/conftest.py). Fixtures live in conftest.py."""

from __future__ import annotations

import torch


def randomize(module, seed: int = 0, std: float = 0.05):
    """Every parameter N(0, std²) from a seeded generator: outputs then depend on every weight (DiT's
    zero-initialised gates and decoder would hide a wrongly mapped tensor). Returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module
