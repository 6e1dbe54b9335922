"""Sample grids: one row per class, labelled; and the trainer's periodic EMA grid with fixed noise and labels."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ditscale.objectives import LEGACY_RECORD
from ditscale.sampling.core import decode, index_seeds, load_vae, sample_latents, sampling_process, to_uint8
from ditscale.sampling.registry import check_fits, sampler_info

# The official DiT sample.py's classes: golden retriever, otter, panda, geyser, macaw, valley, balloon, arctic fox.
IMAGENET_SHOWCASE = (207, 360, 387, 974, 88, 979, 417, 279)


def _row_label(label: int, class_names) -> str:
    if class_names is None:
        return str(label)
    name = str(class_names[label]).split(",")[0].strip()  # ImageNet: first synonym
    text = f"{label} {name}"
    return text if len(text) <= 28 else text[:27] + "…"


def save_grid(images, labels, path, class_names=None, *, min_cell: int = 64, pad: int = 2):
    """Write a PNG grid, one row per distinct label (in order of first appearance), its images left to right,
    the row labelled "id name" (PIL's default font). images: (N, H, W, 3) uint8 array / tensor, or a float
    tensor (N, 3, H, W) in [-1, 1]. Images smaller than min_cell pixels are enlarged (nearest) by an integer
    factor. Returns the PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    if isinstance(images, torch.Tensor):
        images = to_uint8(images) if images.is_floating_point() else images.cpu().numpy()
    images = np.asarray(images)
    labels = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_grid: expected images (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if len(labels) != len(images):
        raise ValueError(f"save_grid: {len(images)} images but {len(labels)} labels")
    rows: dict[int, list[np.ndarray]] = {}
    for image, label in zip(images, labels):
        rows.setdefault(label, []).append(image)

    factor = max(1, math.ceil(min_cell / max(images.shape[1:3])))
    h, w = images.shape[1] * factor, images.shape[2] * factor
    font = ImageFont.load_default()
    texts = {label: _row_label(label, class_names) for label in rows}
    text_w = max(int(math.ceil(font.getlength(t))) for t in texts.values()) + 2 * pad
    cols = max(len(r) for r in rows.values())
    canvas = Image.new("RGB", (text_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, row) in enumerate(rows.items()):
        top = pad + r * (h + pad)
        draw.text((pad, top + h // 2), texts[label], fill="black", font=font, anchor="lm")
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (text_w + pad + c * (w + pad), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return canvas


# --------------------------------------------------------------------------------------------------
# Periodic EMA grids during training
# --------------------------------------------------------------------------------------------------


@dataclass
class GridConfig:
    """What `ema_grid` draws. classes: None picks the official showcase for 1000 classes, else the first 8.
    vae: a local AutoencoderKL directory or "none" (pixel mode); scale_factor: None = the VAE's
    scaling_factor (1.0 in pixel mode). objective: the training objective's record (None: the paper's DDPM
    with the model's learn_sigma); sampler must be one of its samplers (ddim / ddpm, or a flow sampler);
    cfg_interval: (lo, hi) noise fractions where guidance applies (None: everywhere)."""

    classes: list[int] | None = None
    num_per_class: int = 4
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 4.0
    guide_channels: int | str = 3
    seed: int = 0
    vae: str = "none"
    scale_factor: float | list[float] | None = None
    class_names: list[str] | None = field(default=None, repr=False)
    objective: dict | None = None
    cfg_interval: tuple[float, float] | None = None

    def __post_init__(self):
        try:
            check_fits(self.sampler, (self.objective or LEGACY_RECORD)["kind"])
        except ValueError as e:
            raise ValueError(f"GridConfig.sampler: {e}") from None
        for key in ("num_per_class", "steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GridConfig.{key} must be a positive int, got {value!r}")
        if self.classes is not None and (not self.classes or any(int(c) < 0 for c in self.classes)):
            raise ValueError(f"GridConfig.classes must be non-empty class ids >= 0, got {self.classes!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "GridConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown grid setting(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)

    @classmethod
    def from_dataset(cls, meta: dict, **overrides) -> "GridConfig":
        """Defaults from a dataset.json dict (vae, scale_factor, classes → class_names), then overrides."""
        base = {
            "vae": meta.get("vae", "none"),
            "scale_factor": meta.get("scale_factor"),
            "class_names": meta.get("classes"),
        }
        return cls.from_dict({**base, **overrides})

    def class_ids(self, num_classes: int) -> list[int]:
        if self.classes is None:
            return list(IMAGENET_SHOWCASE) if num_classes == 1000 else list(range(min(8, num_classes)))
        bad = [c for c in self.classes if int(c) >= num_classes]
        if bad:
            raise ValueError(f"GridConfig.classes {bad} out of range for a model of {num_classes} classes")
        return [int(c) for c in self.classes]


@functools.lru_cache(maxsize=2)
def _cached_vae(path: str, device: str):
    return load_vae(path, device)


def vae_and_scale(vae: str | None, scale_factor, device):
    """(AutoencoderKL or None, scale factor) for a VAE path or "none"; scale_factor None = the VAE's."""
    if vae is None or str(vae) == "none":
        return None, 1.0 if scale_factor is None else scale_factor
    module = _cached_vae(str(vae), str(device))
    return module, module.config.scaling_factor if scale_factor is None else scale_factor


def ema_grid(model, cfg, step: int, out_dir, tb_writer=None, tag: str = "samples/ema", should_stop=None) -> Path:
    """Sample `cfg` (GridConfig or a dict of its fields) from `model` on its device (bf16 autocast on CUDA)
    with noise and labels fixed by cfg.seed, so grids of successive steps compare; write
    out_dir/grid_{step:08d}.png and, with a TensorBoard SummaryWriter, an image under `tag`. The model's
    train/eval mode is restored. Returns the PNG path. should_stop: asked before every sampler step; True
    raises ditscale.sampling.core.SamplingInterrupted (no PNG written)."""
    cfg = cfg if isinstance(cfg, GridConfig) else GridConfig.from_dict(dict(cfg))
    device = next(model.parameters()).device
    labels = [c for c in cfg.class_ids(model.num_classes) for _ in range(cfg.num_per_class)]
    process = sampling_process(
        cfg.objective or {**LEGACY_RECORD, "learn_sigma": model.learn_sigma}, cfg.sampler, cfg.steps
    )
    flow = sampler_info(cfg.sampler).kind == "flow"
    was_training = model.training
    model.eval()
    try:
        latents = sample_latents(
            model,
            process,
            labels,
            cfg_scale=cfg.cfg_scale,
            guide_channels=cfg.guide_channels,
            sampler=cfg.sampler,
            steps=cfg.steps if flow else None,
            cfg_interval=cfg.cfg_interval,
            should_stop=should_stop,
            seeds=index_seeds(cfg.seed, range(len(labels))),
            device=device,
            autocast=torch.bfloat16 if device.type == "cuda" else None,
        )
    finally:
        model.train(was_training)
    vae, scale = vae_and_scale(cfg.vae, cfg.scale_factor, device)
    images = to_uint8(decode(latents, vae, scale))
    path = Path(out_dir) / f"grid_{step:08d}.png"
    grid = save_grid(images, labels, path, cfg.class_names)
    if tb_writer is not None:
        tb_writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
    return path
