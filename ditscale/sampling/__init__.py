"""Sampling: guided DDPM / DDIM latents (core), labelled PNG grids (grid), resumable multi-rank ADM .npz (npz)."""
from ditscale.sampling.core import (
                                    GuidedSampler,
                                    decode,
                                    index_labels,
                                    index_seeds,
                                    load_vae,
                                    sample_latents,
                                    sampling_diffusion,
                                    to_uint8,
)
from ditscale.sampling.grid import GridConfig, ema_grid, save_grid

__all__ = ["GridConfig", "GuidedSampler", "decode", "ema_grid", "index_labels", "index_seeds", "load_vae",
           "sample_latents", "sampling_diffusion", "save_grid", "to_uint8"]
