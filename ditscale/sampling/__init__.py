"""Sampling: guided latents from any registered sampler (core, registry), labelled PNG grids (grid), resumable
multi-rank ADM .npz (npz)."""

from ditscale.sampling.core import (
    GuidedSampler,
    SamplingInterrupted,
    decode,
    index_labels,
    index_seeds,
    load_vae,
    sample_latents,
    sampling_diffusion,
    sampling_process,
    to_uint8,
)
from ditscale.sampling.grid import GridConfig, ema_grid, save_grid
from ditscale.sampling.registry import SAMPLERS, check_fits, sampler_info

__all__ = [
    "SAMPLERS",
    "GridConfig",
    "GuidedSampler",
    "SamplingInterrupted",
    "check_fits",
    "decode",
    "ema_grid",
    "index_labels",
    "index_seeds",
    "load_vae",
    "sample_latents",
    "sampler_info",
    "sampling_diffusion",
    "sampling_process",
    "save_grid",
    "to_uint8",
]
