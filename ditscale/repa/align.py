"""REPA's alignment term as pure functions: the projector, the token-grid match, the per-sample loss.

projector = build_projector(hidden_size=1152, encoder_dim=768)     # Linear-SiLU-Linear-SiLU-Linear, 2048
target = match_tokens(encoder_tokens, num_tokens=256)              # (N, 256, 768): interpolated if needed
per_sample = alignment_loss(projector(hidden), target)             # (N,) mean negative cosine, in [-1, 1]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTOR_WIDTH = 2048


def build_projector(hidden_size: int, encoder_dim: int, width: int = PROJECTOR_WIDTH) -> nn.Sequential:
    """REPA's 3-layer MLP with SiLU, DiT tokens (N, T, hidden_size) → (N, T, encoder_dim)."""
    return nn.Sequential(
        nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, encoder_dim)
    )


def grid_side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{what}: {num_tokens} tokens do not form a square grid")
    return side


def match_tokens(target: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Encoder patch tokens (N, S, D) on the DiT's grid of `num_tokens`: unchanged when the grids agree,
    else resized as a (D, √S, √S) feature map (area means when shrinking, bilinear when enlarging)."""
    n, s, d = target.shape
    if s == num_tokens:
        return target
    src, dst = grid_side(s, "encoder patch tokens"), grid_side(num_tokens, "DiT tokens")
    grid = target.transpose(1, 2).reshape(n, d, src, src)  # (N, D, √S, √S)
    if dst < src:
        grid = F.adaptive_avg_pool2d(grid, dst)  # area: means over covered patches
    else:
        grid = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)  # (N, T, D)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over tokens: (N, T, D) × (N, T, D) → (N,) fp32."""
    if projected.shape != target.shape:
        raise ValueError(f"projected tokens {tuple(projected.shape)} and targets {tuple(target.shape)} differ")
    p = F.normalize(projected.float(), dim=-1)
    q = F.normalize(target.float(), dim=-1)
    return -(p * q).sum(-1).mean(-1)
