"""Sampling over many ranks into the ADM evaluator's .npz, resumable after a kill.

Sample i is fully determined by (run seed, i) (noise and label, see `core.index_seeds`), so the work is a
fixed list of chunks of sample indices [j·S, (j+1)·S), chunk j belonging to rank j mod world_size. Each
finished chunk is written to a temporary file and renamed into place: a chunk file exists whole or not at
all. A rerun (any world size) skips the chunks that exist, so nothing is duplicated or missing; rank 0 waits
for every chunk, then streams them, in index order, into one .npz without holding all images in memory.

    DIR/manifest.json                   the run's settings; a rerun must match them
    DIR/chunks/000123.npz               images (n, H, W, 3) uint8, labels (n,), indices (n,) int64
    DIR/samples_{N}x{H}x{W}x3.npz       arr_0 images, arr_1 labels (ADM's name and layout), and `meta`: the
                                        manifest's settings (CFG scale, sampler, steps, guided channels,
                                        label mode, EMA / raw weights, …) and the images per class, as JSON
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ditscale.files import atomic_write
from ditscale.runtime import RankEnv

# --------------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------------


def chunk_ranges(num_samples: int, chunk_size: int) -> list[range]:
    return [range(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]


def chunk_path(root, j: int) -> Path:
    return Path(root) / "chunks" / f"{j:06d}.npz"


def done_chunks(root, num_chunks: int) -> set[int]:
    return {j for j in range(num_chunks) if chunk_path(root, j).is_file()}


def write_chunk(root, j: int, images: np.ndarray, labels: np.ndarray, indices) -> Path:
    path = chunk_path(root, j)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = dict(
        images=np.ascontiguousarray(images, dtype=np.uint8),
        labels=np.asarray(labels, np.int64),
        indices=np.asarray(list(indices), np.int64),
    )
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def read_chunk(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in ("images", "labels", "indices")}


def prepare_dir(root, settings: dict, chunk_size: int) -> int:
    """Create DIR/manifest.json with settings + chunk_size, or check a rerun's settings against it.
    Returns the run's chunk size (the first run's: a rerun may use another batch size)."""
    root = Path(root)
    (root / "chunks").mkdir(parents=True, exist_ok=True)
    path = root / "manifest.json"
    if not path.is_file():
        text = json.dumps({**settings, "chunk_size": chunk_size}, indent=2, sort_keys=True) + "\n"
        atomic_write(path, text)  # every rank may write it
    manifest = json.loads(path.read_text())
    saved = {k: v for k, v in manifest.items() if k != "chunk_size"}
    now = json.loads(json.dumps(settings))  # tuples → lists, as saved
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if diff:
        lines = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{root} holds samples of other settings ({lines}); resume with the same flags or "
            "use another --npz-out directory"
        )
    return int(manifest["chunk_size"])


def wait_for_chunks(
    root, num_chunks: int, stall_timeout: float = 3600.0, poll: float = 2.0, progress: bool = False
) -> None:
    """Block until all chunk files exist; raise if none appears for stall_timeout seconds."""
    have = len(done_chunks(root, num_chunks))
    bar = None
    if progress and have < num_chunks:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_chunks, initial=have, desc="waiting for other ranks", unit="chunk")
    last = time.monotonic()
    while have < num_chunks:
        time.sleep(poll)
        now = len(done_chunks(root, num_chunks))
        if now > have:
            if bar is not None:
                bar.update(now - have)
            have, last = now, time.monotonic()
        elif time.monotonic() - last > stall_timeout:
            missing = sorted(set(range(num_chunks)) - done_chunks(root, num_chunks))
            raise RuntimeError(
                f"{root}: no new chunk for {stall_timeout:g} s; {len(missing)} missing (first "
                f"{missing[:10]}): a rank may have died. Rerun the same command to resume."
            )
    if bar is not None:
        bar.close()


def npz_name(num_samples: int, height: int, width: int) -> str:
    return f"samples_{num_samples}x{height}x{width}x3.npz"


def read_npz_meta(path) -> dict | None:
    """The sampling settings stored in a samples .npz by `assemble` (None for other .npz files)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta"])) if "meta" in data.files else None


def assemble(root, num_samples: int, chunk_size: int) -> Path:
    """Stream every chunk, in index order, into DIR/samples_{N}x{H}x{W}x3.npz (arr_0 uint8 images,
    arr_1 int64 labels, meta: manifest.json + images per class), checking that chunk j holds exactly
    sample indices [j·S, (j+1)·S)."""
    ranges = chunk_ranges(num_samples, chunk_size)
    missing = sorted(set(range(len(ranges))) - done_chunks(root, len(ranges)))
    if missing:
        raise ValueError(f"{root}: cannot assemble, {len(missing)} chunk(s) missing (first {missing[:10]})")
    height, width = read_chunk(chunk_path(root, 0))["images"].shape[1:3]
    out = Path(root) / npz_name(num_samples, height, width)
    if out.is_file():  # renamed into place: complete
        return out
    labels = np.empty(num_samples, np.int64)
    manifest_path = Path(root) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member,
                    {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                        "fortran_order": False,
                        "shape": (num_samples, height, width, 3),
                    },
                )
                for j, span in enumerate(ranges):
                    chunk = read_chunk(chunk_path(root, j))
                    shape = (len(span), height, width, 3)
                    if chunk["indices"].tolist() != list(span) or chunk["images"].shape != shape:
                        raise ValueError(
                            f"{chunk_path(root, j)}: holds indices {chunk['indices'][:3].tolist()}… "
                            f"images {chunk['images'].shape}; expected {span}, {shape}. "
                            "Delete it and rerun to redo it"
                        )
                    member.write(np.ascontiguousarray(chunk["images"], np.uint8).tobytes())
                    labels[span.start : span.stop] = chunk["labels"]
            with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)
            counts = np.bincount(labels)
            counts = counts[counts > 0]
            meta = {
                **manifest,
                "per_class_min": int(counts.min()),
                "per_class_max": int(counts.max()),
                "classes_present": int(len(counts)),
            }
            with zf.open("meta.npy", "w") as member:
                np.lib.format.write_array(member, np.array(json.dumps(meta, sort_keys=True)))

    atomic_write(out, write)
    return out


def run_chunks(
    root,
    num_samples: int,
    chunk_size: int,
    produce: Callable,
    env: RankEnv = RankEnv(),
    progress: bool = False,
    stall_timeout: float = 3600.0,
) -> Path | None:
    """This rank's missing chunks: produce(indices: range) → (images (n, H, W, 3) uint8, labels (n,)),
    each written as it finishes. Rank 0 then waits for all chunks and assembles the .npz (returned);
    other ranks return None."""
    ranges = chunk_ranges(num_samples, chunk_size)
    done = done_chunks(root, len(ranges))
    mine = [j for j in range(env.rank, len(ranges), env.world_size) if j not in done]
    bar = None
    if progress and env.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(len(ranges[j]) for j in mine),
            desc=f"sampling (rank 0 of {env.world_size})",
            unit="img",
            smoothing=0.1,
        )
    for j in mine:
        images, labels = produce(ranges[j])
        write_chunk(root, j, images, labels, ranges[j])
        if bar is not None:
            bar.update(len(ranges[j]))
    if bar is not None:
        bar.close()
    if env.rank != 0:
        return None
    wait_for_chunks(root, len(ranges), stall_timeout, poll=min(2.0, stall_timeout / 10), progress=progress)
    return assemble(root, num_samples, chunk_size)
