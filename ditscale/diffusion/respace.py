"""Timestep respacing: run a T-step diffusion on a subset of its steps (e.g. 250 of 1000, or DDIM's 50).

The respaced process keeps ᾱ at the kept steps s_0 < s_1 < …: its β_i = 1 − ᾱ_{s_i} / ᾱ_{s_{i−1}}, so its
marginals q(x_i | x₀) are exactly those of the original process at step s_i. The model, trained on the
original steps, is called with s_i rather than i.
"""

from __future__ import annotations

import torch

from .gaussian import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The original steps to keep.

    section_counts: "ddimN" — every k-th step from 0 with k chosen so there are exactly N (as in DDIM);
    "N" or "N1,N2,…" (or an int / list of ints) — the T steps are cut into equal sections (the first
    T mod len sections one step longer) and N_i steps are taken evenly spaced within section i, both ends
    included (for N_i > 1).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddimN' with N an integer") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps"
            )
        try:
            section_counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {section_counts!r}: expected 'ddimN', 'N' or comma-separated counts 'N1,N2,…'"
            ) from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    if not section_counts or any(c < 0 for c in section_counts) or sum(section_counts) == 0:
        raise ValueError(f"timestep_respacing {section_counts!r}: counts must be ≥ 0 and not all zero")
    if len(section_counts) > num_timesteps:
        raise ValueError(f"timestep_respacing {section_counts!r}: more sections than the {num_timesteps} steps")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion with betas `betas` restricted to the steps `use_timesteps` (see module docstring)."""

    def __init__(self, use_timesteps, betas, **kwargs):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        kept = sorted(set(int(s) for s in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(betas) - 1}")
        timestep_map = torch.tensor(kept, dtype=torch.long)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[timestep_map]
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        super().__init__(1.0 - alphas_cumprod / previous, **kwargs)
        self.original_num_steps = len(betas)
        self.timestep_map = timestep_map
        self._device_maps: dict[torch.device, torch.Tensor] = {}

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        timestep_map = self._device_maps.get(t.device)
        if timestep_map is None:
            timestep_map = self._device_maps[t.device] = self.timestep_map.to(t.device)
        return timestep_map[t].to(t.dtype)
