"""The DiT model family: `DiT`, its presets and block types, FLOP/parameter counts and the diffusers converter."""

from ditscale.models.dit import BLOCKS, DIT_PRESETS, BlockType, DiT, block_type, build_dit, dit_config, register_block

__all__ = ["BLOCKS", "DIT_PRESETS", "BlockType", "DiT", "block_type", "build_dit", "dit_config", "register_block"]
