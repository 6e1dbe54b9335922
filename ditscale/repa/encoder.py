"""The frozen vision encoder REPA aligns to: DINOv2 ViT-S/B/L/G-14 (timm's architectures), from a local file.

    encoder = load_encoder("dinov2_vitb14", "/models/dinov2_vitb14.safetensors", device)
    target = encoder(images_u8, size=224)               # (N, 256, 768) fp32 patch tokens, no class token

Weights are read from the file the user downloaded once, never fetched: safetensors (e.g. timm's
`vit_base_patch14_dinov2.lvd142m` model.safetensors) or a plain state dict `.pth` (Meta's
`dinov2_vitb14_pretrain.pth`) through `torch.load(weights_only=True)`; Meta's layout is converted by timm's
own filter, then loaded strictly, so a file of another architecture is refused naming it. Frozen: eval
mode, no gradients, bf16 on a GPU (fp32 on a CPU). Input as REPA prepares it: [0, 1], ImageNet mean/std,
bicubic resize (256 → 224; the positional table is interpolated to the grid, as DINOv2 does).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditscale.weights import read_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 14

# name: VisionTransformer kwargs (timm's vit_*_patch14_dinov2 definitions; all use 518-px positions).
ENCODERS: dict[str, dict] = {
    "dinov2_vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
    "dinov2_vitg14": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, swiglu=True),
    # DINOv2's layout at toy size: random-weight tests and CPU benches only, there are no such weights.
    "vit_tiny_test": dict(embed_dim=32, depth=2, num_heads=2),
}


class EncoderError(ValueError):
    """An encoder that cannot be used: unknown name, missing file, weights of another architecture."""


def encoder_dim(name: str) -> int:
    """Width of the encoder's patch tokens (what the projector maps to)."""
    return _arch(name)["embed_dim"]


def encoder_input_size(resolution: int) -> int:
    """REPA's encoder resolution for images of `resolution`: 224 per 256 pixels, in whole patches."""
    return max(PATCH, round(resolution * 224 / 256 / PATCH) * PATCH)


def _arch(name: str) -> dict:
    if name not in ENCODERS:
        raise EncoderError(f"repa.encoder: unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return dict(ENCODERS[name])


def build_vit(name: str) -> nn.Module:
    """The encoder's architecture with random weights (timm VisionTransformer; positions resized at run time)."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    arch = _arch(name)
    extra = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU) if arch.pop("swiglu", False) else {}
    return VisionTransformer(
        img_size=518, patch_size=PATCH, init_values=1e-5, num_classes=0, dynamic_img_size=True, **arch, **extra
    )


def read_encoder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors (`ditscale.weights.read_tensors`: never unpickling code), also from checkpoints
    that wrap the state dict under "model", "state_dict" or "teacher"."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(
            f"repa.encoder_weights: {path} does not exist (download the encoder's weights once; see README 'REPA')"
        )
    try:
        return read_tensors(path, unwrap=("model", "state_dict", "teacher"))
    except ValueError as e:
        raise EncoderError(f"repa.encoder_weights: cannot read {path}: {e}") from None


class FrozenEncoder(nn.Module):
    """A frozen ViT giving patch tokens (N, T, D) of uint8 images (N, C, H, W), C = 3 or 1 (grey → RGB)."""

    def __init__(self, vit: nn.Module, name: str):
        super().__init__()
        self.vit, self.name = vit.eval().requires_grad_(False), name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.vit.embed_dim

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # always in eval mode

    def preprocess(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """uint8 (N, C, H, W) → (N, 3, size, size) fp32: [0, 1], ImageNet-normalised, bicubic resize."""
        x = images.float().div(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, size: int) -> torch.Tensor:
        dtype = next(self.vit.parameters()).dtype
        tokens = self.vit.forward_features(self.preprocess(images, size).to(dtype))  # (N, prefix + T, D)
        return tokens[:, self.vit.num_prefix_tokens :].float()  # (N, T, D)


def load_encoder(name: str, path: str | Path, device: torch.device, dtype: torch.dtype | None = None) -> FrozenEncoder:
    """The named encoder with the weights of `path`, frozen, on `device` (bf16 on CUDA, fp32 elsewhere
    unless `dtype` is given). EncoderError names the file when it does not fit the architecture."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):  # shapes only: the file gives every tensor (no random init of a ViT-G)
        vit = build_vit(name)
    state = read_encoder_weights(path)
    patch = state.get("patch_embed.proj.weight")
    if patch is None or tuple(patch.shape) != tuple(vit.patch_embed.proj.weight.shape):
        raise EncoderError(
            f"repa.encoder_weights: {path} does not fit repa.encoder={name} (patch embedding "
            f"{None if patch is None else tuple(patch.shape)}, expected "
            f"{tuple(vit.patch_embed.proj.weight.shape)})"
        )
    try:
        state = checkpoint_filter_fn(state, vit)  # Meta's DINOv2 layout → timm's; resized positions
        vit.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise EncoderError(
            f"repa.encoder_weights: {path} does not fit repa.encoder={name} ({' '.join(first[:3])[:400]})"
        ) from None
    left = [n for n, t in [*vit.named_parameters(), *vit.named_buffers()] if t.is_meta]
    if left:
        raise EncoderError(f"repa.encoder_weights: {path} leaves {left[:5]} of repa.encoder={name} unset")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return FrozenEncoder(vit.to(device=device, dtype=dtype), name).to(device)  # normalisation stays fp32
