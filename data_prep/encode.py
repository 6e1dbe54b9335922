"""`python -m data_prep encode`: images → ADM center crop → VAE posterior (image and mirror) → shards.

One process is one worker; it encodes its slices (see slices.py) one after the other, each into its own
sub-directory, published only when complete (see writers.py). A rerun skips complete slices. Decoding
and cropping run in DataLoader workers; encoding is batched (bf16 and channels-last on a GPU); a thread
writes shards while the next batch encodes.

    python -m data_prep encode --input /data/imagenet/train --out /data/in256 --vae /models/sd-vae-ft-ema \
        --resolution 256 --num-slices 64            # SLURM array / torchrun place each worker
    python -m data_prep merge /data/in256 && python -m data_prep verify /data/in256
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from data_prep import images, slices
from data_prep.errors import DataPrepError
from data_prep.report import bad_limit, check_bad, make_report, summary_line, to_json
from data_prep.writers import BackgroundWriter, SliceOutput, open_slice_writer, other_slicings
from ditscale import runtime
from ditscale.data.image_column import CODECS as IMAGE_CODECS
from ditscale.data.image_column import ImageColumn
from ditscale.data.records import PIXEL_VALUES, PIXELS, POSTERIOR
from ditscale.data.schema import FORMATS, REPORT_JSON, SUMMARY_JSON, slice_name

DEFAULT_SCALE = 0.18215  # SD VAE (sd-vae-ft-ema / -mse); used when a VAE config lacks scaling_factor
KILL_AFTER_ENV = "DATA_PREP_TEST_KILL_AFTER"  # test hook: SIGKILL the process after run() encoded N images
_ENCODED_IN_PROCESS = [0]


# --- configuration -----------------------------------------------------------------------------------


@dataclass
class EncodeConfig:
    """Everything an encode job needs; validates itself."""

    input: str
    out: str
    resolution: int = 256
    vae: str = "none"  # local AutoencoderKL directory, or "none" for pixel mode
    format: str = "mds"  # mds | wds
    input_format: str = "auto"  # auto | folder | wds
    classes: str | None = None  # class names file for wds input (JSON list / one per line)
    scale_factor: str = "auto"  # auto (the VAE's scaling_factor) | measure | a number
    image_channels: int | None = None  # pixel mode only: 3 (RGB) or 1 (grey); a VAE sets its own
    batch_size: int | None = None  # images per encoder call (default: default_batch_size)
    decode_workers: int | None = None  # DataLoader workers decoding images (default: cores - 1; pixel mode: cores)
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the encoder
    shard_size: int = 1 << 26  # bytes per shard before compression
    worker: int | None = None
    num_workers: int | None = None
    num_slices: int | None = None  # default: one per worker
    staging: str | None = None  # local directory in front of a remote / shared output
    max_bad_fraction: float = 0.01
    min_side: int = 0  # skip images whose short side is below this (0: keep, note if < resolution)
    max_aspect: float = 0.0  # skip images with long/short side above this (0: keep, note if > 3)
    exif_orientation: bool = True  # apply EXIF orientation (False: as torchvision ImageFolder / ADM)
    limit: int | None = None  # encode only the first N inputs (trials)
    overwrite: bool = False  # encode complete slices again
    progress: bool = True
    keep_image: str | None = None  # also store the cropped image: png (lossless) | jpeg
    image_quality: int = 95  # JPEG quality for keep_image=jpeg
    compression: str = "auto"  # MDS shards: auto (zstd for posteriors, none for pixels) | zstd | zstd:N | none

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataPrepError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.input_format not in ("auto", "folder", "wds"):
            raise DataPrepError(f"--input-format {self.input_format!r}: expected auto, folder or wds")
        if self.resolution < 1:
            raise DataPrepError(f"--resolution {self.resolution}: must be positive")
        if self.scale_factor not in ("auto", "measure"):
            try:
                if float(self.scale_factor) <= 0:
                    raise ValueError
            except ValueError:
                raise DataPrepError(
                    f"--scale-factor {self.scale_factor!r}: expected auto, measure or a positive number"
                ) from None
        if self.image_channels not in (None, 1, 3):
            raise DataPrepError(f"--image-channels {self.image_channels}: expected 1 or 3")
        if self.image_channels is not None and self.vae != "none":
            raise DataPrepError("--image-channels is for pixel mode (--vae none); a VAE takes its own")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise DataPrepError(f"--dtype {self.dtype!r}: expected auto, fp32, bf16 or fp16")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise DataPrepError(f"--max-bad-fraction {self.max_bad_fraction}: expected a value in [0, 1]")
        for name in ("batch_size", "shard_size", "num_slices", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataPrepError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.decode_workers is not None and self.decode_workers < 0:
            raise DataPrepError(f"--decode-workers {self.decode_workers}: must be ≥ 0")
        if self.keep_image not in (None, *IMAGE_CODECS):
            raise DataPrepError(f"--keep-image {self.keep_image!r}: expected one of {IMAGE_CODECS}")
        if not 1 <= self.image_quality <= 100:
            raise DataPrepError(f"--image-quality {self.image_quality}: expected 1..100")
        if not re.fullmatch(r"auto|none|zstd(:([1-9]|1[0-9]|2[0-2]))?", self.compression):
            raise DataPrepError(f"--compression {self.compression!r}: expected auto, none, zstd or zstd:1 … zstd:22")
        if self.format != "mds" and self.compression not in ("auto", "none"):
            raise DataPrepError(
                f"--compression {self.compression}: only MDS shards are compressed (--format {self.format})"
            )
        try:
            self.image_checks()
        except ValueError as e:
            raise DataPrepError(str(e)) from None

    @property
    def record(self) -> str:
        """What a record holds (ditscale.data.records): the pixels in pixel mode, else the posterior."""
        return PIXELS if self.vae == "none" else POSTERIOR

    def image_checks(self) -> images.ImageChecks:
        return images.ImageChecks(
            self.resolution, self.min_side, self.max_aspect, exif_orientation=self.exif_orientation
        )

    def image_column(self, channels: int) -> ImageColumn | None:
        """The image column this job writes (--keep-image), for images of `channels` channels."""
        if self.keep_image is None:
            return None
        quality = self.image_quality if self.keep_image == "jpeg" else None
        return ImageColumn(self.keep_image, self.resolution, channels, quality)


# --- encoders ------------------------------------------------------------------------------------------


def to_unit_range(images_u8: torch.Tensor) -> torch.Tensor:
    """(n, H, W, C) uint8 → (n, C, H, W) fp32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5) do."""
    return images_u8.permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


class PixelEncoder:
    """`--vae none`: the image itself is the "latent", stored as its uint8 pixels (records.py's "pixels"
    record: readers give mean = PIXEL_VALUES[pixels], logvar = -inf). Statistics come from the decode
    workers' value counts and `values`."""

    downsample, scaling_factor = 1, 1.0
    values = PIXEL_VALUES

    def __init__(self, channels: int):
        self.in_channels = self.latent_channels = channels

    def __call__(self, images_u8: torch.Tensor) -> dict[str, np.ndarray]:
        return {"pixels": images_u8.numpy()}  # (n, H, W, C) uint8


def check_vae_dir(path: str) -> tuple[str, dict]:
    """(directory, config) of a local diffusers AutoencoderKL with safetensors weights, or a
    DataPrepError saying what is wrong. Cheap: runs before any input is listed."""
    if not os.path.isdir(path):
        raise DataPrepError(
            f"--vae {path}: not a directory; give a local diffusers AutoencoderKL "
            f"(e.g. a download of stabilityai/sd-vae-ft-ema) or 'none' for pixel mode"
        )
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "vae", "config.json")
    ):
        path = os.path.join(path, "vae")  # a whole pipeline directory: use its vae/
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise DataPrepError(
            f"--vae {path}: no config.json (expected a diffusers AutoencoderKL directory as written by save_pretrained)"
        )
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataPrepError(f"--vae {config_file}: unreadable ({e})") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or "latent_channels" not in config:
        raise DataPrepError(
            f"--vae {config_file}: describes a {config.get('_class_name', 'model')}, not an AutoencoderKL"
        )
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (
            (
                f" (found {', '.join(sorted(pickles))}: pickled weights are never loaded; convert them "
                f"with AutoencoderKL.from_pretrained(...).save_pretrained(dir, safe_serialization=True) "
                f"where you trust the file)"
            )
            if pickles
            else ""
        )
        raise DataPrepError(f"--vae {path}: no .safetensors weights{hint}")
    return path, config


def vae_identity(path: str) -> str:
    """A cheap fingerprint of a VAE directory (config, and size, head and tail of each weights file):
    tells sd-vae-ft-ema from sd-vae-ft-mse, which share a config."""
    h = hashlib.sha1()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{name}:{size}".encode() + f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read())
    return h.hexdigest()[:16]


class VaeEncoder:
    """diffusers AutoencoderKL: posterior mean and log-variance of the image and of its mirror."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, compile: bool):
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True)
        except Exception as e:  # diffusers raises many kinds for a broken directory
            raise DataPrepError(f"--vae {path}: cannot load the AutoencoderKL: {e}") from None
        vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if device.type == "cuda":
            vae = vae.to(memory_format=torch.channels_last)
        self.vae, self.device, self.dtype = vae, device, dtype
        self.encode = torch.compile(vae.encode) if compile else vae.encode
        self.in_channels = int(vae.config.in_channels)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE)

    values = None  # not a function of the pixel value: statistics come from the posteriors

    @torch.inference_mode()
    def __call__(self, images_u8: torch.Tensor) -> dict[str, np.ndarray]:
        n = images_u8.shape[0]
        x = to_unit_range(images_u8.to(self.device, non_blocking=True))  # (n, C, H, W)
        x = torch.cat([x, x.flip(-1)]).to(self.dtype)  # (2n, C, H, W)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        dist = self.encode(x).latent_dist
        return {"mean": _by_image(dist.mean, n), "logvar": _by_image(dist.logvar, n)}


def _by_image(t: torch.Tensor, n: int) -> np.ndarray:
    """(2n, c, h, w) [images; mirrors] → (n, 2, c, h, w) fp16 on the host."""
    return t.float().unflatten(0, (2, n)).transpose(0, 1).half().contiguous().cpu().numpy()


def default_batch_size(encoder, device: torch.device) -> int:
    """64 on a GPU; on a CPU a VAE runs fastest on tiny batches (its activations outgrow the caches:
    the SD VAE at 256 px takes 10 s for one image and its mirror, 80 s for four), pixel mode on large."""
    if device.type == "cuda":
        return 64
    return 32 if isinstance(encoder, PixelEncoder) else 1


def pick_device(name: str) -> torch.device:
    """`ditscale.runtime.pick_device` for this process; workers on one node may share a GPU."""
    return runtime.pick_device(runtime.rank_env(), name, share_gpus=True)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# --- latent statistics (for --scale-factor measure) ---------------------------------------------------


class LatentStats:
    """Per-channel sums giving the variance of sampled latents exactly (no ε drawn):
    Var z = E[mean² + exp(logvar)] − E[mean]², over images, both flips and positions."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels)
        self.sum_sq = np.zeros(channels)

    def update(self, mean: np.ndarray, logvar: np.ndarray) -> None:
        """mean, logvar: (n, 2, C, h, w), as stored (fp16)."""
        m, v = mean.astype(np.float64), np.exp(logvar.astype(np.float64))
        dims = (0, 1, 3, 4)
        self.count += m.size // m.shape[2]
        self.sum += m.sum(dims)
        self.sum_sq += (m * m + v).sum(dims)

    def update_from_histogram(self, counts: np.ndarray, values: np.ndarray) -> None:
        """Pixel mode, where the stored value is `values[v]` for pixel value v and logvar is -inf:
        counts (C, 256) of each value per channel over a batch of images (their mirrors add the same)."""
        x = values.astype(np.float64)
        self.count += 2 * int(counts[0].sum())
        self.sum += 2 * counts @ x
        self.sum_sq += 2 * counts @ (x * x)

    def to_json(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist()}


def scale_from_stats(stats: list[dict]) -> list[float]:
    """1 / std per channel from the slices' LatentStats sums."""
    count = sum(s["count"] for s in stats)
    if count == 0:
        raise DataPrepError("--scale-factor measure: no samples to measure")
    total = np.sum([s["sum"] for s in stats], 0) / count
    total_sq = np.sum([s["sum_sq"] for s in stats], 0) / count
    std = np.sqrt(np.maximum(total_sq - total**2, 0.0))
    if np.any(std == 0):
        raise DataPrepError("--scale-factor measure: a latent channel has zero variance")
    return (1.0 / std).tolist()


# --- inputs ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    kind: str  # folder | wds
    root: str
    items: list  # folder: (relative path, label); wds: tar paths
    classes: list[str] | None
    fingerprint: str

    def dataset(self, part: list, size: int, channels: int, checks: images.ImageChecks, histograms: bool):
        if self.kind == "folder":
            return images.FolderImages(self.root, part, size, channels, checks, histograms)
        num_classes = len(self.classes) if self.classes else None
        return images.TarImages(part, size, channels, num_classes, checks, histograms)


def list_inputs(cfg: EncodeConfig) -> Inputs:
    kind = cfg.input_format
    if kind == "auto":
        kind = (
            "wds"
            if (
                cfg.input.endswith(".tar")
                or "{" in cfg.input
                or (
                    os.path.isdir(cfg.input)
                    and any(n.endswith(".tar") for n in os.listdir(cfg.input))
                    and not any(e.is_dir() for e in os.scandir(cfg.input))
                )
            )
            else "folder"
        )
    try:
        if kind == "folder":
            items, classes = images.list_image_folder(cfg.input)
            if cfg.classes:
                raise DataPrepError("--classes is for webdataset input; folder names are the classes")
            lines = (f"{rel}\t{label}" for rel, label in items[: cfg.limit])
        else:
            items = images.list_tars(cfg.input)
            classes = images.read_class_names(cfg.classes) if cfg.classes else None
            lines = (f"{os.path.basename(t)}\t{os.path.getsize(t)}" for t in items[: cfg.limit])
    except (OSError, ValueError) as e:
        raise DataPrepError(str(e)) from None
    items = items[: cfg.limit]
    if not items:
        raise DataPrepError(f"--input {cfg.input}: no inputs")
    digest = hashlib.sha1("\n".join(lines).encode()).hexdigest()
    return Inputs(kind, cfg.input, items, classes, f"{kind}:{len(items)}:{digest[:16]}")


# --- the job ---------------------------------------------------------------------------------------------


def settings_of(cfg: EncodeConfig, inputs: Inputs, vae_id: str, num_slices: int) -> dict[str, Any]:
    """What must agree between the slices of one dataset."""
    return {
        "format": cfg.format,
        "resolution": cfg.resolution,
        "vae_id": vae_id,
        "image_channels": cfg.image_channels or (3 if cfg.vae == "none" else None),
        "input": inputs.fingerprint,
        "num_slices": num_slices,
        "scale_factor": cfg.scale_factor,
        "min_side": cfg.min_side,
        "max_aspect": cfg.max_aspect,
        "exif_orientation": cfg.exif_orientation,
        "keep_image": cfg.keep_image,
        "image_quality": cfg.image_quality if cfg.keep_image == "jpeg" else None,
        "record": cfg.record,
        "compression": cfg.compression,
    }


def _decode_workers(cfg: EncodeConfig) -> int:
    """--decode-workers, else this worker's share of the cores, less one for the VAE's process (pixel mode's
    main process only hands batches to the writer: with one worker per core it ran 1.4x faster on 2 cores
    than with cores - 1, bench/RESULTS.md)."""
    if cfg.decode_workers is not None:
        return cfg.decode_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(16, cores - (cfg.record == POSTERIOR)))


def run(cfg: EncodeConfig) -> list[dict[str, Any]]:
    """Encode this worker's unfinished slices; returns the summaries of the slices it wrote."""
    _ENCODED_IN_PROCESS[0] = 0
    try:
        worker, num_workers, origin = slices.resolve_worker(cfg.worker, cfg.num_workers)
    except ValueError as e:
        raise DataPrepError(str(e)) from None
    num_slices = cfg.num_slices or num_workers
    if cfg.vae != "none":
        vae_path, _ = check_vae_dir(cfg.vae)
        vae_id = vae_identity(vae_path)
    else:
        if cfg.scale_factor == "measure":
            raise DataPrepError("--scale-factor measure needs a VAE (pixel mode stores images)")
        vae_id = "none"
    inputs = list_inputs(cfg)
    settings = settings_of(cfg, inputs, vae_id, num_slices)
    mine = slices.slices_of_worker(worker, num_workers, num_slices)
    log(
        f"worker {worker}/{num_workers} ({origin}): slices {mine} of {num_slices}, "
        f"{len(inputs.items)} {'images' if inputs.kind == 'folder' else 'tar shards'} in all"
    )

    others = other_slicings(cfg.out, num_slices)
    if others:
        raise DataPrepError(
            f"{cfg.out} holds slices of another slicing ({', '.join(others[:3])}); "
            f"use the --num-slices they were made with, or another --out"
        )
    pending = []
    for k in mine:
        output = SliceOutput(cfg.out, slice_name(k, num_slices), cfg.staging)
        if not cfg.overwrite and output.is_complete():
            _check_same_settings(output, settings)
            log(f"{output.name}: already complete, skipped")
        else:
            pending.append((k, output))
    if not pending:
        return []

    device = pick_device(cfg.device)
    if cfg.vae != "none":
        encoder = VaeEncoder(vae_path, device, pick_dtype(cfg.dtype, device), cfg.compile)
    else:
        encoder = PixelEncoder(cfg.image_channels or 3)
    if cfg.resolution % encoder.downsample:
        raise DataPrepError(
            f"--resolution {cfg.resolution}: must be a multiple of the VAE's downsampling factor {encoder.downsample}"
        )
    summaries, start = [], time.time()
    for k, output in pending:
        part = list(slices.take_slice(inputs.items, num_slices, k))
        summaries.append(encode_slice(cfg, inputs, part, output, encoder, device, settings))
    if len(summaries) > 1:
        total = {
            "slice": f"worker {worker}/{num_workers}, {len(summaries)} slices",
            "elapsed_s": time.time() - start,
            **{k: sum(s[k] for s in summaries) for k in ("num_samples", "skipped", "shards", "bytes", "image_bytes")},
        }
        log(summary_line({**total, "images_per_s": total["num_samples"] / max(total["elapsed_s"], 1e-9)}))
    return summaries


def _check_same_settings(output: SliceOutput, settings: dict) -> None:
    old = output.read_summary().get("settings", {})
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
        raise DataPrepError(
            f"{output.final} was written with other settings ({detail}); use another --out, or --overwrite to redo it"
        )


def encode_slice(
    cfg: EncodeConfig, inputs: Inputs, part: list, output: SliceOutput, encoder, device: torch.device, settings: dict
) -> dict[str, Any]:
    """Encode one slice and publish it; raises TooManyBadInputs (after writing the report)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    output.reset()
    workers = _decode_workers(cfg)
    batch_size = cfg.batch_size or default_batch_size(encoder, device)
    histograms = encoder.values is not None  # statistics from value counts taken in the decode workers
    dataset = inputs.dataset(part, cfg.resolution, encoder.in_channels, cfg.image_checks(), histograms)
    kept = cfg.image_column(encoder.in_channels)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(images.collate, keep=kept),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    latent_size = cfg.resolution // encoder.downsample
    writer = BackgroundWriter(
        open_slice_writer(
            cfg.format,
            output,
            encoder.latent_channels,
            latent_size,
            cfg.shard_size,
            kept,
            cfg.record,
            cfg.compression,
        )
    )
    stats, bad, notes, good, max_label = LatentStats(encoder.latent_channels), [], [], 0, -1
    image_bytes = 0
    total = len(part) if inputs.kind == "folder" else None  # tar sample counts are unknown up front
    kill_after = int(os.environ.get(KILL_AFTER_ENV, 0))
    report_path = os.path.join(output.local, REPORT_JSON)
    start = time.time()
    with tqdm(
        total=total, unit="img", desc=output.name, disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr
    ) as bar:
        for batch in loader:
            bad += batch["bad"]
            notes += batch["notes"]
            if total is not None and len(bad) > bad_limit(total, cfg.max_bad_fraction):
                _fail(writer, output, report_path, total, bad, cfg)
            if batch["images"] is not None:
                arrays = encoder(batch["images"])  # records.py's columns, batched
                if histograms:
                    stats.update_from_histogram(batch["histogram"], encoder.values)
                else:
                    stats.update(arrays["mean"], arrays["logvar"])
                writer.put(arrays, batch["labels"].tolist(), batch["keys"], batch["kept"])
                image_bytes += sum(map(len, batch["kept"] or ()))
                good += len(batch["keys"])
                max_label = max(max_label, int(batch["labels"].max()))
                _ENCODED_IN_PROCESS[0] += len(batch["keys"])
                if kill_after and _ENCODED_IN_PROCESS[0] >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.update(len(batch["keys"]) + len(batch["bad"]))
            bar.set_postfix(skipped=len(bad), refresh=False)
    shards = writer.finish()
    elapsed = time.time() - start
    seen = good + len(bad)
    if len(bad) > bad_limit(seen, cfg.max_bad_fraction):
        _fail(None, output, report_path, seen, bad, cfg)
    meta = {
        "format": cfg.format,
        "resolution": cfg.resolution,
        "latent_channels": encoder.latent_channels,
        "latent_size": latent_size,
        "image_channels": encoder.in_channels,
        "vae": cfg.vae,
        "record": cfg.record,
        "scale_factor": (
            cfg.scale_factor
            if cfg.scale_factor == "measure"
            else encoder.scaling_factor
            if cfg.scale_factor == "auto"
            else float(cfg.scale_factor)
        ),
        "classes": inputs.classes,
        "image": kept and kept.to_json(),
        "settings": settings,
    }
    return publish_slice(
        output,
        meta,
        num_samples=good,
        max_label=max_label,
        bad=bad,
        notes=notes,
        inputs=seen,
        shards=shards,
        stats=stats,
        elapsed=elapsed,
        device=str(device),
        config=_jsonable(cfg),
        image_bytes=image_bytes,
    )


def publish_slice(
    output: SliceOutput,
    meta: dict,
    *,
    num_samples: int,
    max_label: int,
    bad: list,
    inputs: int,
    shards: list[dict],
    stats: LatentStats,
    elapsed: float,
    notes: list = (),
    **extra: Any,
) -> dict[str, Any]:
    """Write a finished slice's report.json and summary.json (last: the slice is then complete).

    meta: what all slices share (format, resolution, latent_channels, latent_size, image_channels,
    vae, scale_factor, classes, image, settings); merge builds dataset.json from it."""
    report = make_report(output.name, inputs, bad, notes)
    summary = {
        "slice": output.name,
        **meta,
        "max_label": max_label,
        "num_samples": num_samples,
        "inputs": inputs,
        "skipped": len(bad),
        **report["noted"],
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "elapsed_s": elapsed,
        "images_per_s": num_samples / max(elapsed, 1e-9),
        "latent_stats": stats.to_json(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    output.publish({REPORT_JSON: to_json(report), SUMMARY_JSON: to_json(summary)})
    log(summary_line(summary))
    return summary


def _fail(
    writer: BackgroundWriter | None, output: SliceOutput, report_path: str, total: int, bad: list, cfg: EncodeConfig
) -> None:
    if writer is not None:
        writer.abort()
    os.makedirs(output.local, exist_ok=True)
    with open(report_path, "wb") as f:
        f.write(to_json(make_report(output.name, total, bad)))
    check_bad(bad, total, cfg.max_bad_fraction, output.name, report_path)


def _jsonable(cfg: EncodeConfig) -> dict:
    return asdict(cfg)


def log(message: str) -> None:
    print(f"data_prep encode: {message}", file=sys.stderr, flush=True)


# --- command line ----------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="ImageNet-layout folder (root/<class>/<image>) or "
        "webdataset image tars (a directory of .tar, a brace pattern or a glob)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="dataset root: a local directory or a remote URL (s3://, gs://, oci://, azure://, hf://)",
    )
    p.add_argument("--resolution", type=int, default=256, help="center-crop size (a multiple of 8 for the SD VAE)")
    p.add_argument(
        "--vae",
        default="none",
        help="local diffusers AutoencoderKL directory (safetensors), "
        "or 'none': pixel mode, the image in [-1, 1] is the latent",
    )
    p.add_argument("--format", default="mds", choices=FORMATS)
    p.add_argument("--input-format", default="auto", choices=("auto", "folder", "wds"))
    p.add_argument("--classes", help="class names for webdataset input: JSON list or one name per line")
    p.add_argument(
        "--scale-factor",
        default="auto",
        help="auto (the VAE config's scaling_factor, 0.18215 for SD VAEs; 1 in pixel mode), "
        "measure (1/std per channel over all encoded images), or a number",
    )
    p.add_argument("--image-channels", type=int, choices=(1, 3), help="pixel mode: 3 = RGB (default), 1 = grey")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per encoder call (default 64 on GPU; on CPU 1 with a VAE, 32 in pixel mode)",
    )
    p.add_argument(
        "--decode-workers", type=int, help="DataLoader workers decoding images (default: cores - 1; pixel mode: cores)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder")
    p.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per shard before compression")
    p.add_argument(
        "--compression",
        default="auto",
        help="MDS shards: auto (zstd for VAE posteriors; none for pixel mode, whose photographs shrink by "
        "a fifth at three times the writing cost), zstd, zstd:1 … zstd:22, none",
    )
    p.add_argument("--worker", type=int, help="this worker's index (default: torchrun / SLURM array / srun)")
    p.add_argument("--num-workers", type=int, help="number of workers")
    p.add_argument(
        "--num-slices", type=int, help="slices in all (default: one per worker); worker w encodes slices w, w+W, …"
    )
    p.add_argument("--staging", help="local directory to write shards in before uploading them to --out")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail (exit 2) when more of a slice's inputs than this cannot be decoded",
    )
    p.add_argument(
        "--min-side",
        type=int,
        default=0,
        help="skip images whose short side is below this "
        "(default 0: keep them; those below --resolution are upscaled and listed in report.json)",
    )
    p.add_argument(
        "--max-aspect",
        type=float,
        default=0.0,
        help="skip images whose long/short side ratio is "
        "above this (default 0: keep them; those above 3 are listed in report.json)",
    )
    p.add_argument(
        "--ignore-exif-orientation",
        dest="exif_orientation",
        action="store_false",
        help="do not rotate by the EXIF orientation tag (torchvision ImageFolder / ADM behaviour)",
    )
    p.add_argument("--limit", type=int, help="encode only the first N inputs (a trial run)")
    p.add_argument("--overwrite", action="store_true", help="encode complete slices again")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--keep-image",
        nargs="?",
        const="png",
        choices=IMAGE_CODECS,
        help="also store each cropped image at the training resolution (for REPA): png "
        "(lossless, the default when given without a value) or jpeg (--image-quality, 4:4:4)",
    )
    p.add_argument("--image-quality", type=int, default=95, help="JPEG quality for --keep-image jpeg")


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    names = set(EncodeConfig.__dataclass_fields__)
    return EncodeConfig(**{k: v for k, v in vars(args).items() if k in names})
