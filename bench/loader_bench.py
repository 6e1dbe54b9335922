"""Samples/s that ditscale.data delivers from MDS (and webdataset) shards of 4×32×32 posteriors.

Goal (issue 7): 8 GPUs × 650 images/s = 5,200 samples/s per node from at most 2 loader processes,
i.e. ≥ 2,600 samples/s per loader process. Baseline in the same run: a bare StreamingDataset read per
sample with numpy posterior sampling (what a plain reader does). Every setting reads one warm-up
epoch (fills the cache, starts workers), then is timed over the next epoch from its first batch on.

The cost of the shard hash checks (ditscale.data.integrity, goal ≤ 5 %): each format's 2-worker row is
repeated with `check_shard` replaced by a no-op (in this process and the forked workers); the checked
rows re-check every shard each epoch, as fresh DataLoader workers do.

    python bench/loader_bench.py                      # 20,000 synthetic samples in a temp dir
    python bench/loader_bench.py --samples 50000 --batch-size 256 --data /tmp/latents
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.testing import write_synthetic_latents  # noqa: E402
from ditscale.data import build_dataloader, build_dataset, flip_of, sample_latents  # noqa: E402
from ditscale.data import mds as mds_reader  # noqa: E402
from ditscale.data import wds as wds_reader

_caches = itertools.count()


def timed(batches, count) -> float:
    """samples/s over an iterable, from its first element to its end."""
    it = iter(batches)
    first = next(it)
    n, start = 0, time.perf_counter()
    for b in it:
        n += count(b)
    del first
    return n / (time.perf_counter() - start)


def bare_streaming(root: str, cache: str, batch: int) -> float:
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=root, local=cache, shuffle=True, batch_size=batch)
    rng = np.random.default_rng(0)

    def samples():
        for s in ds:
            f = flip_of(0, 0, 0)
            yield s["mean"][f] + np.exp(0.5 * s["logvar"][f].astype(np.float32)) * rng.standard_normal(
                s["mean"].shape[1:], dtype=np.float32
            )

    for _ in samples():
        pass
    return timed(samples(), lambda _: 1)


@contextlib.contextmanager
def unchecked():
    """The readers with their shard hash check replaced by a no-op (forked workers inherit it)."""
    saved = mds_reader.check_shard, wds_reader.check_shard
    mds_reader.check_shard = wds_reader.check_shard = lambda *a, **k: None
    try:
        yield
    finally:
        mds_reader.check_shard, wds_reader.check_shard = saved


def hash_time(root: str) -> tuple[float, int]:
    """(seconds, bytes) of checking every shard's xxh64 once, as a reader does (decompressed, for MDS)."""
    import json

    from ditscale.data.check import stored_file
    from ditscale.data.integrity import digest

    index = json.load(open(os.path.join(root, "index.json" if "mds" in os.path.basename(root) else "wds_index.json")))
    seconds, size = 0.0, 0
    for shard in index["shards"]:
        with open(os.path.join(root, stored_file(shard)["basename"]), "rb") as f:
            data = f.read()
        if shard.get("zip_data"):
            from streaming.base.compression import decompress

            data = decompress(shard["compression"], data)
        start = time.perf_counter()
        digest(data)
        seconds, size = seconds + time.perf_counter() - start, size + len(data)
    return seconds, size


def ours(root: str, cache_root: str, batch: int, workers: int | None, sample: bool = False) -> float:
    kw = {"local": os.path.join(cache_root, f"c{next(_caches)}")} if "mds" in os.path.basename(root) else {}
    ds = build_dataset(root, batch_size=batch, seed=0, **kw)
    if workers is None:  # per-sample iteration in this process
        for _ in ds:
            pass
        return timed(ds, lambda _: 1)
    loader = build_dataloader(ds, batch_size=batch, num_workers=workers, drop_last=False)
    gen = torch.Generator().manual_seed(0)
    scale = ds.metadata["scale_factor"]

    def run():
        for b in loader:
            if sample:
                sample_latents(b["mean"], b["logvar"], scale, gen)
            yield b

    for _ in run():
        pass
    return timed(run(), lambda b: len(b["index"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", help="directory for the synthetic datasets (default: a temp dir)")
    p.add_argument("--no-wds", action="store_true", help="skip the webdataset reader")
    p.add_argument("--hash-only", action="store_true", help="only the shard hash check rows (checked vs not)")
    p.add_argument(
        "--repeats", type=int, default=1, help="alternate checked / not checked this many times (medians reported)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    base = args.data or tempfile.mkdtemp(prefix="loader-bench-")
    roots = {"mds": os.path.join(base, "mds"), "wds": os.path.join(base, "wds")}
    for fmt, root in roots.items():
        if fmt == "wds" and args.no_wds:
            continue
        if not os.path.exists(os.path.join(root, "dataset.json")):
            print(f"writing {args.samples} synthetic samples ({fmt}) to {root}", file=sys.stderr)
            write_synthetic_latents(root, args.samples, format=fmt, num_slices=2)
    caches = tempfile.mkdtemp(prefix="loader-bench-cache-")
    b = args.batch_size
    rows = [
        (
            "bare StreamingDataset, per sample + numpy sampling (baseline)",
            1,
            bare_streaming(roots["mds"], os.path.join(caches, "bare"), b),
        )
    ]
    if not args.hash_only:
        rows.append(("build_dataset (mds), per sample, in process", 1, ours(roots["mds"], caches, b, None)))
        for w in (1, 2):
            rows.append((f"build_dataset (mds) + DataLoader, {w} worker(s)", w, ours(roots["mds"], caches, b, w)))
        rows.append(
            ("mds, 2 workers + sample_latents on this CPU (trainer: on GPU)", 2, ours(roots["mds"], caches, b, 2, True))
        )
        if not args.no_wds:
            for w in (1, 2):
                rows.append((f"build_dataset (wds) + DataLoader, {w} worker(s)", w, ours(roots["wds"], caches, b, w)))
    costs = []
    for fmt in ("mds",) + (() if args.no_wds else ("wds",)):
        checked, plain = [], []
        for _ in range(args.repeats):  # alternated, so a change in the machine's load hits both alike
            checked.append(ours(roots[fmt], caches, b, 2))
            with unchecked():
                plain.append(ours(roots[fmt], caches, b, 2))
        checked_rate, plain_rate = float(np.median(checked)), float(np.median(plain))
        rows.append((f"{fmt}, 2 workers, shard hashes NOT checked", 2, plain_rate))
        rows.append((f"{fmt}, 2 workers, shard hashes checked (again)", 2, checked_rate))
        spread = f", {args.repeats} pairs, per-pair costs " + " ".join(
            f"{100 * (1 - c / u):+.0f}" for c, u in zip(checked, plain)
        )
        costs.append(f"{fmt} {100 * (1 - checked_rate / plain_rate):+.1f} %" + (spread if args.repeats > 1 else ""))
    base_rate = rows[0][2]
    print(
        f"\nloader bench: {args.samples} samples of 2×(2,4,32,32) fp16, batch {b}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'setting':<62} {'samples/s':>10} {'per process':>12} {'vs baseline':>12}")
    for name, procs, rate in rows:
        print(f"{name:<62} {rate:>10,.0f} {rate / procs:>12,.0f} {rate / base_rate:>11.2f}x")
    print("goal: ≥ 2,600 samples/s per loader process (5,200 per node from 2 processes)")
    print(
        f"cost of the shard hash checks (2 workers, checked vs not, same run): {', '.join(costs)} "
        f"(goal ≤ 5 %; timings on a shared machine vary by a few %)"
    )
    for fmt, root in roots.items():
        if fmt == "wds" and args.no_wds:
            continue
        seconds, size = hash_time(root)
        rate = next(r for name, _, r in rows if name.startswith(f"{fmt}, 2 workers, shard hashes checked"))
        print(
            f"{fmt}: xxh64 of every shard once ({size / 1e6:.0f} MB) takes {seconds:.2f} s in one process = "
            f"{100 * seconds / (args.samples / rate):.1f} % of the epoch at the checked rate"
        )
    clean_stale_shared_memory()


if __name__ == "__main__":
    main()
