"""The DiT model family: `DiT`, its presets, FLOP/parameter counts and the diffusers converter."""
from ditscale.models.dit import BLOCKS, DIT_PRESETS, DiT, build_dit, dit_config

__all__ = ["BLOCKS", "DIT_PRESETS", "DiT", "build_dit", "dit_config"]
