"""ADM's center crop, the one preprocessing shared by training data (data_prep) and FID reference images
(ditscale.evaluate): the two must never drift apart."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's (and DiT's) center crop: halve with BOX filtering while the short side is ≥ 2 × size, resize
    with BICUBIC so the short side is `size`, then crop the center. Returns (size, size[, C]) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]
