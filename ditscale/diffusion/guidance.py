"""Classifier-free guidance around an unmodified class-conditional model.

The model sees the doubled batch [x; x] with labels [y; null]; the guided noise prediction
ε̂ = ε(x, ∅) + s·(ε(x, y) − ε(x, ∅)) replaces both halves' first `guide_channels` output channels (the
DiT paper guides 3 of the 4 latent channels by default); the other channels — the remaining latent
channels and the learned-variance channels — pass through from each half. Sample with the doubled
noise, then keep the first half (`samples.chunk(2)[0]`).
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierFreeGuidance(nn.Module):
    """model(x, t, **kwargs) for the doubled batch; built by cfg_wrapper."""

    def __init__(self, model, scale: float, guide_channels: int | str = 3):
        super().__init__()
        if guide_channels != "all" and not (isinstance(guide_channels, int) and guide_channels >= 1):
            raise ValueError(f"guide_channels must be a positive integer or 'all', got {guide_channels!r}")
        self.model = model
        self.scale = float(scale)
        self.guide_channels = guide_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        n, channels = x.shape[0], x.shape[1]
        if n % 2:
            raise ValueError(f"classifier-free guidance needs the doubled batch [cond; uncond], got batch {n}")
        guided = channels if self.guide_channels == "all" else self.guide_channels
        if guided > channels:
            raise ValueError(f"guide_channels={guided} exceeds the input's {channels} channels")
        half = x[: n // 2]
        out = self.model(torch.cat([half, half]), t, **model_kwargs)  # (N, C or 2C, H, W)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2)
        half_eps = uncond + self.scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def cfg_wrapper(model, scale: float, guide_channels: int | str = 3) -> ClassifierFreeGuidance:
    """Guide `model` with scale `scale` on its first `guide_channels` channels (an int, or 'all' for all
    input channels); scale 1 is the conditional model."""
    return ClassifierFreeGuidance(model, scale, guide_channels)


def prepare_cfg_inputs(z: torch.Tensor, y: torch.Tensor, null_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [z; z] (2N, …), labels [y; null_class] (2N,)) for a guided sampling loop."""
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"z has batch {z.shape[0]}, y has {y.shape[0]}")
    return torch.cat([z, z]), torch.cat([y, torch.full_like(y, null_class)])
