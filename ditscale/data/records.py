"""What one stored record holds: dataset.json's "record" key (absent: "posterior", every dataset before it).

- "posterior" (a VAE's latents): `mean` and `logvar`, (2, C, h, w) fp16, 0 = the image, 1 = its mirror.
- "pixels" (pixel mode, `--vae none`): `pixels`, the ADM crop itself, (H, W, C) uint8, once. Its mirror
  is an exact flip and its std is 0, so the posterior columns would be 16 times the bytes for nothing
  (bench/RESULTS.md: writing them cost pixel-mode encoding 4x its time).

Readers, `record()` and verify see either kind as the posterior: `pixel_posterior` gives mean =
PIXEL_VALUES[pixels] (the fp16 bits pixel mode always stored: ToTensor + Normalize(0.5, 0.5)), mirrored
for flip 1, and logvar = -inf. Training on a pixel dataset is bit-identical under both kinds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

POSTERIOR, PIXELS = "posterior", "pixels"
RECORDS = (POSTERIOR, PIXELS)

# fp16 of (v / 255 - 0.5) / 0.5 for v = 0..255, each step rounded in fp32 as torchvision's ToTensor +
# Normalize(0.5, 0.5) do (tests/unit/test_data_records.py compares the bits)
PIXEL_VALUES: np.ndarray = (
    (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
).astype(np.float16)


def record_kind(meta: dict, where: str = "dataset.json") -> str:
    kind = meta.get("record", POSTERIOR)
    if kind not in RECORDS:
        raise ValueError(f"{where}: 'record' is {kind!r}, expected one of {', '.join(RECORDS)}")
    return kind


def columns(kind: str, channels: int, size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The array columns of a record: name -> (dtype, shape). channels/size: the latent's (pixels: the image's)."""
    if kind == PIXELS:
        return {"pixels": (np.dtype(np.uint8), (size, size, channels))}
    shape = (2, channels, size, size)
    return {"mean": (np.dtype(np.float16), shape), "logvar": (np.dtype(np.float16), shape)}


def pixel_posterior(pixels: np.ndarray, flip: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) uint8 → (mean, logvar), each (C, H, W) fp16, of the image (flip 0) or its mirror (1)."""
    chw = pixels.transpose(2, 0, 1)  # (C, H, W) view
    if flip:
        chw = chw[..., ::-1]
    mean = np.empty(chw.shape, np.float16)  # C-contiguous, whatever the layout of `chw`
    np.take(PIXEL_VALUES, chw, out=mean, mode="clip")  # "clip": no bounds buffer (uint8 indexes 256 entries)
    return mean, np.full(chw.shape, -np.inf, np.float16)


def posterior_of(arrays: dict[str, np.ndarray], kind: str, flip: int) -> tuple[np.ndarray, np.ndarray]:
    """A record's (mean, logvar) of one flip, each (C, h, w) fp16, in new arrays (`arrays` may be views
    of a memory-mapped shard)."""
    if kind == PIXELS:
        return pixel_posterior(arrays["pixels"], flip)
    return np.array(arrays["mean"][flip]), np.array(arrays["logvar"][flip])


def as_posterior(rec: dict[str, Any], kind: str, channels: int, size: int) -> dict[str, Any]:
    """A decoded record with `mean` / `logvar` (2, C, h, w) fp16 whatever its kind (the stored columns
    stay); ValueError naming the column when a pixels column has the wrong dtype or shape."""
    if kind != PIXELS:
        return rec
    dtype, shape = columns(kind, channels, size)["pixels"]
    px = np.asarray(rec["pixels"])
    if px.dtype != dtype or px.shape != shape:
        raise ValueError(f"pixels is {px.dtype}{px.shape}, expected {dtype}{shape}")
    flips = [pixel_posterior(px, flip) for flip in (0, 1)]
    return {**rec, "mean": np.stack([f[0] for f in flips]), "logvar": np.stack([f[1] for f in flips])}
