"""Small real inputs for tests, benches and quickstarts: image folders, image tars, a tiny VAE.

Real photographs ship with scikit-image (astronaut, coffee, chelsea, …); crops of them at several sizes
and aspect ratios, plus generated gradients, make an ImageNet-layout folder in milliseconds. The tiny
AutoencoderKL has random weights and the SD VAE's structure at a fraction of the width.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "immunohistochemistry")


def _photos() -> list[np.ndarray]:
    """scikit-image's sample photographs, or none where it is not installed (generated images only)."""
    try:
        import skimage.data
    except ImportError:
        return []
    return [getattr(skimage.data, name)() for name in _PHOTOS]


def sample_images(count: int, seed: int = 0, min_side: int = 40, max_side: int = 96) -> list[Image.Image]:
    """`count` varied images: random crops of the scikit-image photos (RGB and grey) resized to random
    sizes, every fourth one (all, without scikit-image) a generated colour gradient with noise."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        if i % 4 == 3 or not photos:
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 255
            arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            out.append(Image.fromarray(arr))
            continue
        photo = photos[i % len(photos)]
        ph, pw = photo.shape[:2]
        ch, cw = int(rng.integers(ph // 3, ph + 1)), int(rng.integers(pw // 3, pw + 1))
        top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        out.append(crop.resize((w, h), Image.BICUBIC))
    return out


def write_image_folder(
    root: str, *, classes: int = 3, per_class: int = 4, seed: int = 0, min_side: int = 40, max_side: int = 96
) -> str:
    """An ImageNet-layout folder root/class_k/img_i.{jpg,png}; returns root."""
    images = sample_images(classes * per_class, seed, min_side, max_side)
    for i, image in enumerate(images):
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        ext = "png" if i % 3 == 1 else "jpg"
        image.save(os.path.join(folder, f"img_{i:04d}.{ext}"), quality=90)
    return root


def write_image_tars(folder: str, out_dir: str, per_tar: int = 5) -> list[str]:
    """The images of an ImageNet-layout folder as webdataset tars (`<key>.<ext>` + `<key>.cls`)."""
    import io
    import tarfile

    from data_prep.images import list_image_folder

    items, _ = list_image_folder(folder)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for t in range(0, len(items), per_tar):
        path = os.path.join(out_dir, f"images-{t // per_tar:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for rel, label in items[t : t + per_tar]:
                key = os.path.splitext(rel.replace(os.sep, "_"))[0]
                with open(os.path.join(folder, rel), "rb") as f:
                    data = f.read()
                for name, payload in (
                    (f"{key}{os.path.splitext(rel)[1].lower()}", data),
                    (f"{key}.cls", str(label).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def save_tiny_vae(path: str, *, latent_channels: int = 4, seed: int = 0) -> str:
    """A random-weight diffusers AutoencoderKL (downsampling 2, 8/16 channels) saved as safetensors."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    vae.save_pretrained(path, safe_serialization=True)
    return path


def write_synthetic_latents(
    out: str,
    num_samples: int,
    *,
    latent_channels: int = 4,
    latent_size: int = 32,
    num_classes: int = 1000,
    format: str = "mds",
    num_slices: int = 1,
    shard_size: int = 1 << 26,
    seed: int = 0,
    nan_samples: tuple[int, ...] = (),
    compression: str = "auto",
) -> str:
    """A merged dataset of random posteriors (no images, no VAE) through the real writers and merge:
    loader benchmarks and trainer tests at ImageNet-latent shapes in seconds. The posterior means of
    `nan_samples` (indices) are NaN, for the trainer's fault tests. compression: `--compression`'s values
    (auto: MDS shards in zstd). Returns `out`."""
    import time

    from data_prep.encode import LatentStats, publish_slice
    from data_prep.merge import merge
    from data_prep.slices import take_slice
    from data_prep.writers import BackgroundWriter, SliceOutput, open_slice_writer
    from ditscale.data.schema import slice_name

    rng = np.random.default_rng(seed)
    shape = (2, latent_channels, latent_size, latent_size)
    settings = {"format": format, "synthetic": seed, "num_slices": num_slices, "input": num_samples}
    meta = {
        "format": format,
        "resolution": latent_size * 8,
        "latent_channels": latent_channels,
        "latent_size": latent_size,
        "image_channels": 3,
        "vae": "synthetic",
        "scale_factor": 0.18215,
        "classes": [f"class_{i}" for i in range(num_classes)],
        "settings": settings,
    }
    for k in range(num_slices):
        output = SliceOutput(out, slice_name(k, num_slices))
        output.reset()
        writer = BackgroundWriter(
            open_slice_writer(format, output, latent_channels, latent_size, shard_size, compression=compression)
        )
        stats, start, indices = LatentStats(latent_channels), time.time(), take_slice(range(num_samples), num_slices, k)
        labels = rng.integers(0, num_classes, len(indices))
        for lo in range(0, len(indices), 256):
            n = min(256, len(indices) - lo)
            mean = rng.standard_normal((n, *shape), dtype=np.float32).astype(np.float16) * 5
            logvar = rng.uniform(-12, -4, (n, *shape)).astype(np.float16)
            stats.update(mean, logvar)
            for j, i in enumerate(indices[lo : lo + n]):
                if i in nan_samples:
                    mean[j] = np.nan
            keys = [f"synthetic/{i:09d}" for i in indices[lo : lo + n]]
            writer.put({"mean": mean, "logvar": logvar}, labels[lo : lo + n].tolist(), keys)
        shards = writer.finish()
        publish_slice(
            output,
            meta,
            num_samples=len(indices),
            max_label=int(labels.max(initial=-1)),
            bad=[],
            inputs=len(indices),
            shards=shards,
            stats=stats,
            elapsed=time.time() - start,
        )
    merge(out)
    return out
