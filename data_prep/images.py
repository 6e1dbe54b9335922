"""Image inputs: an ImageNet-layout folder or webdataset tars of images; decoding with ADM's center crop.

Every input is decoded by content, whatever its extension, and anything that fails (unreadable,
truncated, not an image, empty) becomes a `bad` record with the reason, never an exception: the job
counts and lists those and carries on.

What real image sets contain (`to_rgb_or_l`, `ImageChecks`):
- EXIF orientation is applied first (PIL's `ImageOps.exif_transpose`), so phone photos are upright, as
  in any viewer. torchvision's ImageFolder (and ADM's ImageNet script) do not apply it;
  `--ignore-exif-orientation` reproduces them exactly.
- 16-bit and 32-bit integer images (PNG/TIFF modes I;16*, I) are scaled to 8 bits (value / 257), float
  images (F) are read as [0, 1]; palette, bilevel, CMYK, YCbCr, LA/RGBA images go through PIL's
  conversion (alpha is dropped, as ADM does).
- Images whose short side is below the resolution (they are upscaled) or whose aspect ratio exceeds
  `ImageChecks.report_aspect` (the center crop keeps a small part) are kept and listed as notes in
  report.json; `--min-side` / `--max-aspect` skip them instead.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ditscale.data.crop import center_crop_arr

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "gif"}
LABEL_EXTS = ("cls", "class", "label")


# --- listing -----------------------------------------------------------------------------------------


def list_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(items (relative path, label) sorted by path, class names): torchvision ImageFolder's labels
    (sorted class folder names), every non-hidden file under a class folder, symlinks followed."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--input {root}: not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"--input {root}: no class folders (expected the ImageNet train layout root/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            items += [(os.path.join(rel, f), label) for f in filenames if not f.startswith(".")]
    items.sort()
    return items, classes


def list_tars(spec: str) -> list[str]:
    """Tar shards named by a directory (its *.tar), a brace pattern (a-{000..099}.tar), a glob or a file."""
    if os.path.isdir(spec):
        tars = glob.glob(os.path.join(spec, "*.tar"))
    elif "{" in spec:
        from braceexpand import braceexpand

        tars = list(braceexpand(spec))
        missing = [t for t in tars if not os.path.isfile(t)]
        if missing:
            raise FileNotFoundError(f"--input {spec}: {len(missing)} shards missing, e.g. {missing[0]}")
    else:
        tars = glob.glob(spec)
    if not tars:
        raise FileNotFoundError(f"--input {spec}: no tar shards found")
    return sorted(tars)


def read_class_names(path: str) -> list[str]:
    """Class names from a JSON list or a text file with one name per line (index = label)."""
    with open(path) as f:
        text = f.read()
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--classes {path}: expected a JSON list of names or one name per line")
    return names


# --- decoding (ADM's center crop: ditscale.data.crop) ----------------------------------------------


@dataclass(frozen=True)
class ImageChecks:
    """What decoding checks of an image's size (after EXIF orientation): `min_side` / `max_aspect` skip
    (0 = never), the resolution and `report_aspect` only add notes."""

    resolution: int
    min_side: int = 0
    max_aspect: float = 0.0
    report_aspect: float = 3.0
    exif_orientation: bool = True

    def __post_init__(self) -> None:
        if self.min_side < 0 or self.max_aspect < 0:
            raise ValueError(f"--min-side {self.min_side} / --max-aspect {self.max_aspect}: must be >= 0")
        if 0 < self.max_aspect < 1:
            raise ValueError(f"--max-aspect {self.max_aspect}: a ratio long/short side, >= 1 (0 = off)")

    def notes(self, width: int, height: int) -> list[str]:
        """The notes for a kept image; ValueError (the image is skipped) past a threshold."""
        short, aspect = min(width, height), max(width, height) / max(1, min(width, height))
        if short < 1:
            raise ValueError(f"empty image {width}x{height}")
        if short < self.min_side:
            raise ValueError(f"too small: {width}x{height}, short side < --min-side {self.min_side}")
        if self.max_aspect and aspect > self.max_aspect:
            raise ValueError(f"extreme aspect ratio {aspect:.1f} ({width}x{height}) > --max-aspect {self.max_aspect}")
        out = []
        if short < self.resolution:
            out.append(f"upscaled: {width}x{height}, short side < resolution {self.resolution}")
        if aspect > self.report_aspect:
            out.append(f"extreme aspect: {aspect:.1f} ({width}x{height})")
        return out


def to_rgb_or_l(image: Image.Image, channels: int) -> Image.Image:
    """8-bit RGB (channels 3) or L (channels 1), with high-bit-depth modes scaled, not clipped."""
    mode = "RGB" if channels == 3 else "L"
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = arr * 255.0 if image.mode == "F" else arr / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return image if image.mode == mode else image.convert(mode)


def decode_image(source, size: int, channels: int, checks: ImageChecks | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode a path or file object, orient it, convert to RGB (or L), center-crop:
    ((size, size, channels) uint8, notes about the image's size); ValueError when `checks` skip it."""
    checks = checks or ImageChecks(size)
    with Image.open(source) as image:
        image.load()
        if checks.exif_orientation:
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        notes = checks.notes(*image.size)
        image = to_rgb_or_l(image, channels)
    arr = center_crop_arr(image, size)
    return arr.reshape(size, size, channels), notes


def channel_histogram(image: np.ndarray) -> np.ndarray:
    """(C, 256) int64: how often each uint8 value occurs in each channel of an (H, W, C) image
    (PIL's one pass in C; numpy's bincount per channel costs several times more)."""
    channels = image.shape[-1]
    pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if channels == 1 else image))  # a crop is a view
    return np.asarray(pil.histogram(), np.int64).reshape(channels, 256)


def _good(image: np.ndarray, label: int, key: str, notes: list[str], histogram: bool) -> dict[str, Any]:
    item = {"ok": True, "image": image, "label": label, "key": key, "notes": notes}
    if histogram:
        item["histogram"] = channel_histogram(image)
    return item


def _bad(key: str, error: BaseException) -> dict[str, Any]:
    return {"ok": False, "key": key, "reason": f"{type(error).__name__}: {error}"}


class FolderImages(Dataset):
    """Map-style dataset over (relative path, label) items of an image folder. histograms: each good
    item also carries its `channel_histogram` (pixel mode's statistics)."""

    def __init__(
        self,
        root: str,
        items: list[tuple[str, int]],
        size: int,
        channels: int,
        checks: ImageChecks | None = None,
        histograms: bool = False,
    ):
        self.root, self.items, self.size, self.channels = root, items, size, channels
        self.checks, self.histograms = checks or ImageChecks(size), histograms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel, label = self.items[i]
        try:
            image, notes = decode_image(os.path.join(self.root, rel), self.size, self.channels, self.checks)
        except Exception as e:  # any failure of one file makes it a skipped input
            return _bad(rel, e)
        return _good(image, label, rel, notes, self.histograms)


class TarImages(IterableDataset):
    """Samples of webdataset image tars (an image member + a `cls` member per key), split over
    DataLoader workers by shard. A shard that breaks off (truncated, unreadable) is reported once."""

    def __init__(
        self,
        tars: list[str],
        size: int,
        channels: int,
        num_classes: int | None = None,
        checks: ImageChecks | None = None,
        histograms: bool = False,
    ):
        self.tars, self.size, self.channels, self.num_classes = tars, size, channels, num_classes
        self.checks, self.histograms = checks or ImageChecks(size), histograms

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for tar in self.tars[worker::workers]:
            yield from self._shard(tar)

    def _shard(self, tar: str) -> Iterator[dict[str, Any]]:
        name, count = os.path.basename(tar), 0
        try:
            with tarfile.open(tar, "r:*") as stream:
                for key, members in _group_by_key(stream):
                    count += 1
                    yield self._sample(f"{name}/{key}", members)
                if tar.endswith(".tar"):
                    _check_end_of_archive(tar, stream.offset)
        except Exception as e:  # a broken tar: what was read is kept, the rest is reported
            yield {"ok": False, "key": name, "reason": f"tar unreadable after {count} samples: {type(e).__name__}: {e}"}

    def _sample(self, key: str, members: dict[str, bytes]) -> dict[str, Any]:
        image = next((members[e] for e in members if e.lower() in IMAGE_EXTS), None)
        label = next((members[e] for e in LABEL_EXTS if e in members), None)
        try:
            if image is None:
                raise ValueError(f"no image member (has {sorted(members)})")
            if label is None:
                raise ValueError(f"no class member {LABEL_EXTS} (has {sorted(members)})")
            label = int(label.decode().strip())
            if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                raise ValueError(f"label {label} outside [0, {self.num_classes})")
            array, notes = decode_image(io.BytesIO(image), self.size, self.channels, self.checks)
        except Exception as e:
            return _bad(key, e)
        return _good(array, label, key, notes, self.histograms)


def _check_end_of_archive(path: str, offset: int) -> None:
    """tarfile ends quietly at a truncated header; a whole archive ends with two zero blocks."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise tarfile.ReadError(f"truncated: no end-of-archive marker at byte {offset}")


def _group_by_key(stream: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members sharing a key (path up to the first dot of the file name), as
    webdataset groups them: yields (key, {extension: bytes})."""
    key, group = None, {}
    for member in stream:
        if not member.isfile():
            continue
        dirname, base = os.path.split(member.name)
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        this = os.path.join(dirname, stem)
        if this != key and group:
            yield key, group
            group = {}
        key = this
        group[ext] = stream.extractfile(member).read()
    if group:
        yield key, group


def collate(batch: list[dict[str, Any]], keep=None) -> dict[str, Any]:
    """Good images stacked (n, H, W, C) uint8 with labels and keys; bad ones as (key, reason); notes on
    good ones as (key, note); "histogram": the (C, 256) counts summed over the good images when the
    dataset took them, else None. keep: an ImageColumn to encode the crops with (in the decode worker)
    as "kept", else kept is None."""
    good = [b for b in batch if b["ok"]]
    images = torch.from_numpy(np.stack([b["image"] for b in good])) if good else None
    return {
        "images": images,
        "labels": torch.tensor([b["label"] for b in good], dtype=torch.int64),
        "keys": [b["key"] for b in good],
        "kept": [keep.encode(b["image"]) for b in good] if keep is not None else None,
        "bad": [(b["key"], b["reason"]) for b in batch if not b["ok"]],
        "notes": [(b["key"], note) for b in good for note in b["notes"]],
        "histogram": np.sum([b["histogram"] for b in good], 0) if good and "histogram" in good[0] else None,
    }
