"""How training draws its times: uniform (the paper, SiT), logit-normal (SD3), and SD3's resolution shift.

Every sampling scheme draws a *noise fraction* u ∈ (0, 1) per sample, 1 = pure noise, 0 = clean data;
each objective maps u to its own time (DDPM: step ⌊u·T⌋; flow in SiT's direction: t = 1 − u, noise at
t = 0). Logit-normal: u = sigmoid(m + s·n), n ~ N(0, 1). Shift s: u' = s·u / (1 + (s − 1)·u), which moves
the draws toward noise for s > 1 (larger images keep more signal at a given noise level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def shift_noise_fraction(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift of noise fractions u (1 = noise)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass(frozen=True)
class TimestepSampling:
    sampling: str = "uniform"
    mean: float = 0.0  # logit-normal m
    std: float = 1.0  # logit-normal s
    shift: float = 1.0

    def __post_init__(self):
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"unknown timestep sampling {self.sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        if not self.std > 0 or not self.shift > 0:
            raise ValueError(f"std and shift must be > 0, got std={self.std}, shift={self.shift}")

    @property
    def is_uniform(self) -> bool:
        """Plain uniform times (no shift): objectives keep their historical draw for it."""
        return self.sampling == "uniform" and self.shift == 1.0

    def noise_fraction(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(n,) fp32 noise fractions in [0, 1): one draw of n numbers from `generator`."""
        if self.sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))
        return u if self.shift == 1.0 else shift_noise_fraction(u, self.shift)
