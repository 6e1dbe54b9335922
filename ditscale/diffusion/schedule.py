"""Noise schedules β_1..β_T as float64 tensors.

linear: the DDPM / DiT schedule, β from 1e-4 to 2e-2 over 1000 steps; for other step counts both ends are
multiplied by 1000 / steps (as ADM does) so that the total noise added stays comparable.
cosine: Improved DDPM's ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2) with s = 0.008, β capped at 0.999.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(num_steps: int) -> torch.Tensor:
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 2e-2, num_steps, dtype=torch.float64)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    """β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T), capped at max_beta, for a continuous ᾱ on [0, 1]."""
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    return math.cos((t + s) / (1.0 + s) * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """β for `name` in SCHEDULES over `num_steps` steps: (num_steps,) float64."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        betas = linear_betas(num_steps)
    elif name == "cosine":
        betas = betas_for_alpha_bar(num_steps, cosine_alpha_bar)
    else:
        raise ValueError(f"unknown noise_schedule {name!r}; expected one of {SCHEDULES}")
    if not (0 < betas.min() and betas.max() < 1):
        raise ValueError(
            f"noise_schedule {name!r} with {num_steps} steps gives β outside (0, 1) "
            f"(max {betas.max().item():.4g}); use more steps"
        )
    return betas
