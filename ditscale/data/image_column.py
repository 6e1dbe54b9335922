"""The optional `image` column: the ADM-cropped uint8 image at the training resolution, beside the posterior.

Written by `data_prep encode --keep-image png|jpeg`, read by `ditscale.data` only when a run asks for it
(`build_dataset(..., with_image=True)`; REPA's frozen encoder sees the clean image). One image per record,
as cropped: its mirror is implied by the record's flip index, exactly as for the posterior (index 1 =
`image[..., ::-1]`). dataset.json says `"image": {"codec": "png"|"jpeg", "quality": int|null, "size",
"channels"}`, or `null` when the shards hold no images.

PNG is lossless (pixel-exact round trip); JPEG is stored at the given quality without chroma
subsampling (4:4:4), ~4× smaller at 256 px.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np

CODECS = ("png", "jpeg")
MDS_ENCODING = "bytes"  # variable-size column: the encoded file, decoded by `decode`
WDS_EXT = {"png": "image.png", "jpeg": "image.jpg"}


@dataclass(frozen=True)
class ImageColumn:
    """How the images of a dataset are stored (dataset.json's "image")."""

    codec: str  # png | jpeg
    size: int  # side of the square crop (the training resolution)
    channels: int  # 3 (RGB) or 1 (grey)
    quality: int | None = None  # JPEG quality 1..100; None for PNG

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"image codec {self.codec!r}: expected one of {CODECS}")
        if self.codec == "jpeg" and not (self.quality and 1 <= self.quality <= 100):
            raise ValueError(f"JPEG quality {self.quality!r}: expected 1..100")
        if self.channels not in (1, 3):
            raise ValueError(f"image channels {self.channels}: expected 1 or 3")

    @property
    def wds_field(self) -> str:
        return WDS_EXT[self.codec]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict | None) -> ImageColumn | None:
        return None if obj is None else cls(**obj)

    def encode(self, image: np.ndarray) -> bytes:
        """(H, W, C) uint8 → the file's bytes."""
        from PIL import Image

        pil = Image.fromarray(image[..., 0] if self.channels == 1 else image)
        buf = io.BytesIO()
        if self.codec == "png":
            pil.save(buf, format="PNG", compress_level=6)
        else:
            pil.save(buf, format="JPEG", quality=self.quality, subsampling=0)
        return buf.getvalue()

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        """The file's bytes → (C, H, W) uint8, checked against the column's shape."""
        from PIL import Image

        with Image.open(io.BytesIO(bytes(data))) as pil:
            arr = np.asarray(pil.convert("L" if self.channels == 1 else "RGB"))
        if arr.shape[:2] != (self.size, self.size):
            raise ValueError(f"stored image is {arr.shape[1]}x{arr.shape[0]}, the column says {self.size}x{self.size}")
        return np.ascontiguousarray(arr.reshape(self.size, self.size, self.channels).transpose(2, 0, 1))


def flipped(image: np.ndarray, flip: int) -> np.ndarray:
    """(C, H, W) image of flip index `flip` (1 = horizontal mirror, as the stored posterior's index 1)."""
    return np.ascontiguousarray(image[..., ::-1]) if flip else image


def image_column_of(meta: dict, where: str) -> ImageColumn:
    """The dataset's image column, or a ValueError saying how to make a dataset with one."""
    column = ImageColumn.from_json(meta.get("image"))
    if column is None:
        raise ValueError(
            f"{where}: the dataset holds no images (dataset.json 'image' is absent); "
            f"re-encode it with `python -m data_prep encode --keep-image png|jpeg ...`"
        )
    return column
