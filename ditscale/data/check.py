"""What the trainer checks of a dataset before any work (`python -m ditscale.train --check [--deep]`, and at
start): the index and every shard it lists, and that the data fills one global batch.

- quick (`--check`, and every start): the index parses, every shard file exists with the size the index
  records (local datasets, and s3:// ones through a listing of the prefix; other remote schemes: the index
  only), the shards' samples sum to dataset.json's. Cost: one stat per shard, or one LIST per 1,000 objects.
- deep (`--check --deep`): also every recorded hash (sha1 and xxh64) of every shard file, i.e. the whole
  dataset is read once: about 1 s per GB at sha1 speed, the time is printed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ditscale.data.integrity import DataError, read_index, shard_problems
from ditscale.data.schema import data_format
from ditscale.data.storage import is_remote, join, list_sizes, local_path, read_bytes


@dataclass
class DatasetCheck:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def stored_file(shard: dict) -> dict:
    """{"basename", "bytes", "hashes"} of the file a shard is stored as (MDS: the compressed one if any)."""
    return (shard.get("zip_data") or shard["raw_data"]) if "raw_data" in shard else shard


def check_dataset(root: str, meta: dict, deep: bool = False) -> DatasetCheck:
    """Every shard of the index against the files (see the module doc); problems name the files."""
    start, out = time.perf_counter(), DatasetCheck()
    _, index = read_index(root, data_format(meta["format"]).index)
    listed = list_sizes(root) if is_remote(root) and not deep else None
    for shard in index["shards"]:
        info = stored_file(shard)
        path = join(root, info["basename"])
        out.shards += 1
        out.samples += int(shard.get("samples", 0))
        if deep:
            try:
                data = read_bytes(path)
            except FileNotFoundError:
                out.problems.append(f"{path}: missing")
                continue
            out.bytes += len(data)
            out.problems += shard_problems(data, info, path)
        elif listed is not None or not is_remote(root):
            try:
                size = listed[path] if listed is not None else os.stat(local_path(path)).st_size
            except (FileNotFoundError, KeyError):
                out.problems.append(f"{path}: missing")
                continue
            if size != info.get("bytes", size):
                out.problems.append(f"{path}: {size} bytes, the index says {info['bytes']}")
    if out.samples != meta["num_samples"]:
        out.problems.append(f"{root}: the index lists {out.samples} samples, dataset.json says {meta['num_samples']}")
    out.seconds = time.perf_counter() - start
    return out


def batches_per_epoch(fmt: str, num_samples: int, *, ranks: int, micro_batch: int, workers: int) -> int:
    """Micro-batches one rank gets from an epoch with drop_last (MDS: streaming deals whole batches to
    workers and pads ranks; webdataset: each worker batches its contiguous share of the rank's samples)."""
    if fmt == "mds":
        return -(-num_samples // ranks) // micro_batch
    per_rank = num_samples // ranks
    parts = max(1, workers)
    return sum((per_rank * (w + 1) // parts - per_rank * w // parts) // micro_batch for w in range(parts))


def check_fills_batch(meta: dict, *, global_batch: int, ranks: int, micro_batch: int, workers: int) -> None:
    """DataError with the numbers when the dataset cannot fill one global batch on these ranks (an epoch
    would give no batch at all, and the loop would wait forever)."""
    n, fmt = meta["num_samples"], meta["format"]
    if n < global_batch:
        raise DataError(
            f"the dataset has {n} samples, fewer than one global batch (train.global_batch="
            f"{global_batch} = {ranks} rank(s) x micro-batch {micro_batch} x accumulation "
            f"{global_batch // (ranks * micro_batch)}): lower train.global_batch or add data"
        )
    if batches_per_epoch(fmt, n, ranks=ranks, micro_batch=micro_batch, workers=workers) == 0:
        raise DataError(
            f"the dataset's {n} samples give no micro-batch of {micro_batch} per rank on {ranks} "
            f"rank(s) with {workers} data.num_workers (each {fmt} worker batches its own "
            f"{n // ranks // max(1, workers)} samples): use fewer workers or a smaller batch"
        )
