"""The module DeepSpeed trains when REPA is on: the DiT plus REPA's projector, as one module.

The DiT's parameters keep their official names; the projector's are under `repa_projector.`, so ZeRO
1/2/3, activation checkpointing (the DiT's blocks), the optimizer and the checkpoints cover both, while
the EMA and every export leave the projector out (`is_training_only`): what comes out is a plain DiT.
"""

from __future__ import annotations

from ditscale.models.dit import DiT
from ditscale.repa.align import PROJECTOR_WIDTH, build_projector

PROJECTOR = "repa_projector"


def is_training_only(name: str) -> bool:
    """Whether a parameter of the training module is REPA's (kept in checkpoints, never exported)."""
    return name.startswith(PROJECTOR + ".")


class DiTWithProjector(DiT):
    """forward(x, t, y, force_drop_ids=None, align=False): the DiT's prediction; with align=True
    `(prediction, {"repa_tokens": (N, T, encoder_dim)})`, the tokens after block `align_block` projected."""

    def __init__(self, *, align_block: int, encoder_dim: int, projector_width: int = PROJECTOR_WIDTH, **dit_kwargs):
        super().__init__(**dit_kwargs)
        if not 1 <= align_block <= len(self.blocks):
            raise ValueError(f"repa.block={align_block} is outside the DiT's blocks 1..{len(self.blocks)}")
        self.align_block = align_block
        self.repa_projector = build_projector(self.config["hidden_size"], encoder_dim, projector_width)
        self.initialize_weights()  # the projector too: xavier-uniform, zero bias

    @staticmethod
    def exports_parameter(name: str) -> bool:
        """False for the projector: the EMA does not follow it and exports leave it out."""
        return not is_training_only(name)

    def forward(self, x, t, y, force_drop_ids=None, align=False):
        if not align:
            return super().forward(x, t, y, force_drop_ids)
        out, hidden = super().forward(x, t, y, force_drop_ids, hidden_block=self.align_block)  # (N, T, D)
        return out, {"repa_tokens": self.repa_projector(hidden)}  # (N, T, E)
