"""Encode throughput of data_prep: bare VAE encoder vs the whole job (JPEG files in, shards written).

The VAE has sd-vae-ft-ema's structure (128/256/512/512 channels, 4 latent channels) with random
weights; the inputs are ImageNet-sized JPEGs (300–500 px sides) cut from scikit-image's photographs
(generated textures where scikit-image is missing). Every row counts images; each image is encoded
twice (itself and its mirror). Rows, in one run:
  bare encoder   — VaeEncoder on a uint8 batch already in host memory (what the device can do),
  decode + crop  — the DataLoader workers alone (JPEG decode + ADM center crop),
  full job       — data_prep.encode.run: decode, encode, statistics, MDS shards with hashes.

    python bench/data_prep_bench.py                        # CPU here; the GPU when there is one
    python bench/data_prep_bench.py --budget 30 --out /tmp/res    # fit in 30 s, write the table there
    python bench/data_prep_bench.py --vs-plain-loop --images 500  # CPU pixel mode vs a plain PIL loop

--vs-plain-loop (issue 20's goal: ≥ 1.0x the plain loop per worker, ≥ 1.8x with 2 workers on 2 cores): the
same JPEGs through a plain loop (PIL open + ADM crop + numpy to [-1, 1], one process, then 2 processes),
through data_prep's decode path alone (FolderImages in 1 and 2 DataLoader workers: open, EXIF, checks,
crop, value counts, batching, hand-over to the main process), and through the whole pixel-mode job
(`--vae none`: decode, statistics, uint8 pixel records into MDS shards with hashes) with 0, 1 and 2
decode workers, and with 2 and zstd shards, side by side, in `--rounds` interleaved rounds (medians).
Each row has images/s (job rows: the summary's rate, worker start included; the one-off imports of
streaming are done before, their cost is in bench/RESULTS.md's import figures) and CPU time per image
over all its processes and threads: the ratio of the latter depends less on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import images as image_io  # noqa: E402
from data_prep.encode import EncodeConfig, VaeEncoder, pick_device, pick_dtype, run  # noqa: E402
from data_prep.testing import sample_images, save_tiny_vae  # noqa: E402

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
START = time.perf_counter()


def left(budget: float | None) -> float:
    return float("inf") if budget is None else budget - (time.perf_counter() - START)


def make_vae(kind: str, path: str) -> str:
    if kind == "tiny":
        return save_tiny_vae(path)
    if kind != "sd":
        return kind  # a real local AutoencoderKL directory
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).half().save_pretrained(path, safe_serialization=True)
    return path


def make_jpegs(root: str, count: int, unique: int = 128) -> None:
    """`count` JPEGs in 10 class folders: `unique` distinct ones, repeated (decoding costs the same)."""
    sources = []
    for i, im in enumerate(sample_images(min(count, unique), seed=1, min_side=300, max_side=500)):
        path = os.path.join(root, f"n{i % 10:08d}", f"img_{i:06d}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        im.convert("RGB").save(path, quality=90)
        sources.append(path)
    for i in range(len(sources), count):
        path = os.path.join(root, f"n{i % 10:08d}", f"img_{i:06d}.JPEG")
        shutil.copyfile(sources[i % len(sources)], path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_encoder(enc: VaeEncoder, res: int, batch: int, repeats: int, seconds: float) -> float:
    """images/s of the encoder on one uint8 batch in (pinned) host memory, posteriors back on the host."""
    x = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8)
    if enc.device.type == "cuda":
        x = x.pin_memory()
    for _ in range(2 if enc.device.type == "cuda" else 1):
        enc(x)
    sync(enc.device)
    start, done = time.perf_counter(), 0
    while done < repeats and (done == 0 or time.perf_counter() - start < seconds):
        mean, logvar = enc(x)
        mean.cpu(), logvar.cpu()
        done += 1
    sync(enc.device)
    return batch * done / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have exited."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def decode_only(root: str, res: int, batch: int, workers: int, seconds: float, histograms: bool = False) -> float:
    """images/s of data_prep's decode path alone: FolderImages in `workers` DataLoader workers."""
    from torch.utils.data import DataLoader

    items, _ = image_io.list_image_folder(root)
    loader = DataLoader(
        image_io.FolderImages(root, items, res, 3, histograms=histograms),
        batch_size=batch,
        num_workers=workers,
        collate_fn=image_io.collate,
        prefetch_factor=4 if workers else None,
    )
    it = iter(loader)
    next(it)  # workers started
    start, n = time.perf_counter(), 0
    for b in it:
        n += len(b["keys"])
        if time.perf_counter() - start > seconds:
            break
    return n / (time.perf_counter() - start)


def _plain(paths: list[str], res: int) -> int:
    import numpy as np
    from PIL import Image

    for path in paths:
        with Image.open(path) as im:
            arr = image_io.center_crop_arr(im.convert("RGB"), res)
        np.asarray(arr, np.float32) / 127.5 - 1.0
    return len(paths)


def plain_loop(root: str, res: int, processes: int) -> float:
    """images/s of a plain PIL open + ADM crop + numpy loop over the folder, in `processes` processes."""
    from concurrent.futures import ProcessPoolExecutor

    items, _ = image_io.list_image_folder(root)
    paths = [os.path.join(root, rel) for rel, _ in items]
    if processes == 1:
        start = time.perf_counter()
        return _plain(paths, res) / (time.perf_counter() - start)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_plain, [[p] for p in paths[:processes]], [res] * processes))  # workers started
        start = time.perf_counter()
        done = sum(pool.map(_plain, [paths[i::processes] for i in range(processes)], [res] * processes))
    return done / (time.perf_counter() - start)


def vs_plain_loop(args, jpegs: str, work: str) -> list[tuple[str, float, float]]:
    """(setting, images/s, CPU ms per image) rows: medians over `args.rounds` rounds of every setting."""
    import statistics

    import streaming  # noqa: F401  (its import, seconds, would land on the first job row)

    count = len(image_io.list_image_folder(jpegs)[0])
    rows: dict[str, list[tuple[float, float]]] = {}

    def measure(name: str, images: int, fn, *fn_args, **fn_kwargs) -> None:
        cpu = cpu_seconds()
        rate = fn(*fn_args, **fn_kwargs)
        rows.setdefault(name, []).append((rate, 1e3 * (cpu_seconds() - cpu) / images))

    def job(workers: int, compression: str) -> float:
        out = os.path.join(work, f"pixel-{workers}-{compression}")
        shutil.rmtree(out, ignore_errors=True)
        cfg = EncodeConfig(
            input=jpegs,
            out=out,
            vae="none",
            resolution=args.resolution,
            format=args.format,
            decode_workers=workers,
            compression=compression,
            worker=0,
            num_workers=1,
            progress=False,
        )
        return run(cfg)[0]["images_per_s"]

    for _ in range(args.rounds):
        measure("plain loop: PIL open + ADM crop + numpy, 1 process", count, plain_loop, jpegs, args.resolution, 1)
        measure("plain loop, 2 processes", count + 2, plain_loop, jpegs, args.resolution, 2)
        for workers in (1, 2):
            measure(
                f"data_prep decode path only, {workers} DataLoader worker(s)",
                count,
                decode_only,
                jpegs,
                args.resolution,
                32,
                workers,
                float("inf"),
                histograms=True,
            )
        for workers in (0, 1, 2):
            measure(f"data_prep encode --vae none, {workers} decode worker(s)", count, job, workers, "auto")
        if args.format == "mds":
            measure("data_prep encode --vae none --compression zstd, 2 decode workers", count, job, 2, "zstd")
    return [
        (name, statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in rows.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="sd", help="sd (random weights, SD-VAE size), tiny, or a local directory")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--images", type=int, help="JPEGs for the full job (default 1024 on GPU, 6 on CPU)")
    p.add_argument("--batch-size", type=int, help="default 64 on GPU, 1 on CPU")
    p.add_argument("--repeats", type=int, help="bare-encoder batches at most (default 20 on GPU, 3 on CPU)")
    p.add_argument("--decode-workers", type=int, help="default: cores - 1")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--format", default="mds", choices=("mds", "wds"))
    p.add_argument("--budget", type=float, help="seconds the whole run may take (phases shrink to fit)")
    p.add_argument("--out", help="directory for data_prep_bench.md and .json")
    p.add_argument("--keep", help="keep inputs and outputs in this directory")
    p.add_argument("--vs-plain-loop", action="store_true", help="CPU pixel mode against a plain PIL loop")
    p.add_argument("--rounds", type=int, default=3, help="--vs-plain-loop: rounds of every setting (medians)")
    args = p.parse_args()
    if args.vs_plain_loop:
        work = args.keep or tempfile.mkdtemp(prefix="data-prep-bench-")
        jpegs = os.path.join(work, "jpegs")
        if not os.path.isdir(jpegs):
            make_jpegs(jpegs, args.images or 200)
        rows = vs_plain_loop(args, jpegs, work)
        title = (
            f"data_prep vs a plain loop: {args.images or 200} JPEGs, {args.resolution}px, {args.format}, "
            f"{os.cpu_count()} cores, medians of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the "
            f"end, {time.strftime('%Y-%m-%d %H:%M')}"
        )
        lines = [
            title,
            "| setting | images/s | vs plain loop (1 process) | CPU ms per image | plain loop's CPU / this CPU |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {rate:,.3g} | {rate / rows[0][1]:.2f}x | {cpu:.1f} | {rows[0][2] / cpu:.2f} |"
            for name, rate, cpu in rows
        ]
        print("\n" + "\n".join(lines))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return
    device = pick_device("auto")
    gpu = device.type == "cuda"
    n_images = args.images or (1024 if gpu else 6)
    batch = args.batch_size or (64 if gpu else 1)
    dtype = pick_dtype(args.dtype, device)
    work = args.keep or tempfile.mkdtemp(prefix="data-prep-bench-")
    os.makedirs(work, exist_ok=True)
    vae_dir = make_vae(args.vae, os.path.join(work, "vae"))
    jpegs = os.path.join(work, "jpegs")
    if not os.path.isdir(jpegs):
        make_jpegs(jpegs, n_images)
    workers = args.decode_workers if args.decode_workers is not None else max(0, (os.cpu_count() or 1) - 1)
    phase = max(1.0, 0.12 * left(args.budget)) if args.budget else float("inf")

    enc = VaeEncoder(vae_dir, device, dtype, args.compile)
    rows = [
        (
            "bare encoder (uint8 batch in host memory → posteriors on host)",
            bare_encoder(enc, args.resolution, batch, args.repeats or (20 if gpu else 3), phase),
        )
    ]
    del enc
    rows.append(
        (
            f"decode + ADM crop only ({workers} DataLoader workers)",
            decode_only(jpegs, args.resolution, batch, workers, phase),
        )
    )
    # size the full job to what is left: startup (~5 s) plus the images at the slower of the two rates
    rate = min(r for _, r in rows)
    limit = n_images if args.budget is None else max(batch, min(n_images, int((left(args.budget) - 8) * rate * 0.7)))
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    [summary] = run(
        EncodeConfig(
            input=jpegs,
            out=out,
            vae=vae_dir,
            resolution=args.resolution,
            format=args.format,
            batch_size=batch,
            decode_workers=workers,
            dtype=args.dtype,
            compile=args.compile,
            worker=0,
            num_workers=1,
            progress=False,
            limit=limit,
        )
    )
    wall = time.perf_counter() - start
    rows.append((f"full job: JPEG → {args.format} shards ({summary['num_samples']} images)", summary["images_per_s"]))
    rows.append(("full job incl. listing, VAE load, worker start", summary["num_samples"] / wall))

    card = torch.cuda.get_device_name(device) if gpu else f"CPU {platform.processor() or platform.machine()}"
    title = (
        f"data_prep bench: {card}, {os.cpu_count()} cores, VAE {args.vae}, {args.resolution}px, {dtype}, "
        f"batch {batch}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    lines = [title, "| setting | images/s | vs bare encoder |", "|---|---|---|"]
    lines += [f"| {name} | {rate:,.3g} | {rate / rows[0][1]:.2f}x |" for name, rate in rows]
    lines.append("(each image is encoded twice: itself and its mirror; goal on one H100: ≥ 1,000 images/s end to end)")
    print("\n" + "\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "data_prep_bench.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "data_prep_bench.json"), "w") as f:
            json.dump({"title": title, "rows": rows, "summary": summary}, f, indent=1, default=str)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
