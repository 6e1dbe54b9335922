"""REPA in the training step: the frozen encoder's targets for a batch, and the term added to the loss.

    repa = build_repa(cfg.repa, image_size=meta["image"]["size"], device=device)
    model_kwargs, aux = repa.for_batch(batch)              # batch["image"]: the clean uint8 images
    terms = objective.loss(engine, x0, labels, g, drop_prob=..., model_kwargs=model_kwargs, aux=aux)
    # terms["repa"] = coeff · mean negative cosine (N,), already inside terms["loss"]

The objective calls the model once with `align=True`; the model (repa.model.DiTWithProjector) returns its
prediction and the projected tokens of block k; the term compares those with the encoder's patch tokens
of the clean image of the same flip. Works with any objective of the seam (DDPM, flow matching).
"""

from __future__ import annotations

import torch

from ditscale.repa.align import alignment_loss, match_tokens
from ditscale.repa.encoder import FrozenEncoder


class AlignmentTerm:
    """An auxiliary loss of the objective seam: coeff · alignment_loss(projected tokens, targets), (N,)."""

    name = "repa"

    def __init__(self, target: torch.Tensor, coeff: float):
        self.target, self.coeff = target, coeff  # (N, S, E) fp32, no grad

    def __call__(self, extras: dict, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if "repa_tokens" not in extras:
            raise RuntimeError(
                "REPA is on but the model returned no projected tokens (build it with "
                "ditscale.repa.model.DiTWithProjector and call it with align=True)"
            )
        projected = extras["repa_tokens"]  # (N, T, E)
        return self.coeff * alignment_loss(projected, match_tokens(self.target, projected.shape[1]))


class Repa:
    """The run's REPA state: frozen encoder, weight λ, encoder input size."""

    def __init__(self, encoder: FrozenEncoder, coeff: float, encoder_size: int):
        self.encoder, self.coeff, self.encoder_size = encoder, coeff, encoder_size

    def for_batch(self, batch: dict) -> tuple[dict, list[AlignmentTerm]]:
        """(model kwargs, auxiliary terms) for a micro-batch whose "image" holds the clean uint8 images
        (N, C, H, W), flipped as its latents."""
        if "image" not in batch:
            raise RuntimeError("REPA is on but the batch has no 'image' (build the dataset with with_image=True)")
        images = batch["image"].to(self.encoder.mean.device, non_blocking=True)
        target = self.encoder(images, self.encoder_size)  # (N, S, E)
        return {"align": True}, [AlignmentTerm(target, self.coeff)]


def build_repa(repa_cfg, image_size: int, device: torch.device) -> Repa:
    """The run's Repa from the config's `repa` section and the kept images' side; EncoderError (naming
    repa.encoder_weights and the file) when the weights do not fit."""
    from ditscale.repa.encoder import encoder_input_size, load_encoder

    encoder = load_encoder(repa_cfg.encoder, repa_cfg.encoder_weights, device)
    return Repa(encoder, repa_cfg.coeff, repa_cfg.encoder_resolution or encoder_input_size(image_size))
