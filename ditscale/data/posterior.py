"""Drawing a latent from the stored posterior, on the trainer's device, per batch."""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def latent_scale(scale_factor: float | Sequence[float], channels: int, device) -> float | torch.Tensor:
    """The multiplier: the Python float for one value, a (1, C, 1, 1) fp32 tensor for one per channel.

    The tensor is cached per (values, device): building it from Python data is a blocking host-to-device
    copy, which once per step would be a host sync in the training loop.
    """
    if isinstance(scale_factor, (int, float)):
        return float(scale_factor)
    values = tuple(float(s) for s in scale_factor)
    if len(values) != channels:
        raise ValueError(f"scale_factor has {len(values)} entries for {channels} channels")
    return _cached_scale(values, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_scale(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, len(values), 1, 1)


def sample_latents(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    scale_factor: float | Sequence[float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """scale * (mean + exp(logvar / 2) * eps) in fp32, eps ~ N(0, I) drawn from `generator`.

    mean, logvar: (N, C, h, w), any float dtype (the shards hold fp16). Pixel-mode data stores
    logvar = -inf, so the result is exactly scale * mean. The generator must live on mean's device.
    """
    if mean.shape != logvar.shape or mean.dim() != 4:
        raise ValueError(
            f"expected mean and logvar of one (N, C, h, w) shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}"
        )
    mean = mean.float()
    std = torch.exp(0.5 * logvar.float())  # (N, C, h, w)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean + std * eps) * latent_scale(scale_factor, mean.shape[1], mean.device)
