"""Reader of data_prep's webdataset shards, giving the same items as the MDS reader.

Tar shards are read front to back, so an epoch is planned in contiguous sample ranges: the shard order
is permuted from (seed, epoch), every rank takes an equal contiguous range of that stream (the
remainder of N / ranks is dropped, so ranks never disagree on the number of steps), and each DataLoader
worker a contiguous part of its rank's range. A seeded buffer shuffles within a worker. Sample indices
count through the shards in index order, as MDS numbers them, so both formats show the same flip.

Resume: `state_dict(num_samples)` / `load_state_dict` keep (epoch, samples consumed). The epoch's plan is
deterministic, and the DataLoader hands out workers' batches in turn, so each worker knows how many of
its samples were consumed and skips them (reading, not decoding, them); worker 0 of the resumed loader
takes the part whose batch was next. The batch sequence after a resume equals the uninterrupted one
when batch size, drop_last, ranks and workers are unchanged. Not elastic: with another number of ranks
or workers the epoch is re-planned and resumes at the same fraction of it, so a few samples of that
epoch may repeat or be missed. Remote shards are streamed by webdataset's gopen (http(s)://, gs://, pipe:)
or fetched whole by streaming's clients (s3://, oci://, azure://, …).
"""

from __future__ import annotations

import io
import math
import random
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ditscale.data.flip import flip_of
from ditscale.data.image_column import ImageColumn, flipped
from ditscale.data.integrity import DataError, check_shard, read_index
from ditscale.data.records import columns, posterior_of, record_kind
from ditscale.data.schema import DATASET_JSON, WDS_INDEX
from ditscale.data.storage import is_remote, join, local_path, patiently, read_bytes
from ditscale.data.tario import tar_samples

# --- the plan of an epoch (pure functions) ---------------------------------------------------------


def split_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """The part-th of `parts` contiguous, near-equal pieces of range(total)."""
    return total * part // parts, total * (part + 1) // parts


def plan_epoch(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    num_ranks: int,
    rank: int,
    num_workers: int,
    worker: int,
) -> list[tuple[int, int, int]]:
    """This worker's (shard, start, stop) sample ranges for the epoch, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    per_rank = sum(counts) // num_ranks
    lo, hi = split_range(per_rank, num_workers, worker)
    lo, hi = rank * per_rank + lo, rank * per_rank + hi
    ranges, at = [], 0
    for shard in order:
        n = counts[shard]
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            ranges.append((int(shard), a - at, b - at))
        at += n
    return ranges


def consumed_per_worker(
    counts: Sequence[int], batch_size: int, drop_last: bool, consumed: int
) -> tuple[list[int], int]:
    """(samples each worker had produced, the worker whose batch comes next) once the DataLoader
    yielded `consumed` samples of this rank. DataLoader takes one batch from each worker in turn and
    passes over a worker with no batch left."""
    batches = [c // batch_size if drop_last else math.ceil(c / batch_size) for c in counts]
    taken = [0] * len(counts)
    for r in range(max(batches, default=0)):
        for w, c in enumerate(counts):
            if r >= batches[w]:
                continue
            size = min(batch_size, c - r * batch_size)
            if consumed < size:
                return taken, w
            taken[w] += size
            consumed -= size
    return taken, 0


# --- the dataset ---------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    from streaming.base.world import World

    world = World.detect()
    return world.rank, world.num_ranks


class LatentWdsDataset(IterableDataset):
    """Items `{"mean": (C, h, w) fp16, "logvar": (C, h, w) fp16, "label": int, "index": int}`, from a
    posterior or a pixels record (records.py).

    A worker reads each of its shards whole and checks its size and xxh64 against wds_index.json before
    parsing it (ditscale.data.integrity); a mismatch, a bad tar or a short shard raises DataError naming
    the shard's file."""

    def __init__(
        self,
        root: str,
        metadata: dict,
        shards: list[dict],
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        hflip: bool = True,
        image: ImageColumn | None = None,
        remote_wait_s: float = 600.0,
    ):
        super().__init__()
        self.root, self.metadata, self.seed, self.shuffle = root, metadata, int(seed), shuffle
        self.shuffle_buffer, self.hflip, self.image, self.remote_wait_s = shuffle_buffer, hflip, image, remote_wait_s
        self.urls = [join(root, s["basename"]) for s in shards]
        self.infos = [{"bytes": s.get("bytes"), "hashes": s.get("hashes")} for s in shards]
        self.counts = [int(s["samples"]) for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64).tolist()
        self._record = record_kind(metadata, join(root, DATASET_JSON))
        self._arrays = {  # name -> (dtype, shape, the .npy header data_prep writes for it)
            name: (dtype, shape, _npy_header(dtype, shape))
            for name, (dtype, shape) in columns(
                self._record, metadata["latent_channels"], metadata["latent_size"]
            ).items()
        }
        self.next_epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples consumed over all ranks)
        self._active: tuple[int, int, int, bool] | None = None  # (epoch, consumed, batch size, drop_last)
        self._current_epoch = 0

    def __len__(self) -> int:
        return sum(self.counts) // _world()[1]

    # --- epochs and checkpoints (called in the main process) ------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = int(epoch)

    def begin_epoch(self, batch_size: int | None = None, drop_last: bool = False) -> None:
        """Fix the epoch (and any resume offset) that workers started now will read."""
        if self._resume is not None:
            epoch, consumed = self._resume
            self._resume = None
        else:
            epoch, consumed = self.next_epoch, 0
        self.next_epoch = epoch + 1
        self._current_epoch = epoch
        self._active = (epoch, consumed, batch_size or 1, drop_last)

    def end_epoch(self) -> None:
        self._active = None

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Like StreamingDataset.state_dict: num_samples counts samples yielded over all ranks."""
        start = 0 if from_beginning or self._active is None else self._active[1]
        return {
            "format": "wds",
            "epoch": self._current_epoch,
            "sample_in_epoch": start + int(num_samples),
            "seed": self.seed,
        }

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if obj.get("format") != "wds":
            raise ValueError(f"not a webdataset reader state: {obj}")
        self.seed = int(obj["seed"])
        self._resume = (int(obj["epoch"]), int(obj["sample_in_epoch"]))

    # --- iteration (in each worker) -------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._active is None:
            self.begin_epoch()
        epoch, consumed, batch_size, drop_last = self._active
        rank, num_ranks = _world()
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info else (0, 1)
        per_rank = sum(self.counts) // num_ranks
        sizes = [hi - lo for lo, hi in (split_range(per_rank, num_workers, w) for w in range(num_workers))]
        taken, next_worker = consumed_per_worker(sizes, batch_size, drop_last, consumed // num_ranks)
        # DataLoader starts its round with worker 0: worker 0 plays the part whose batch is next
        worker = (physical + next_worker) % num_workers
        skip = taken[worker]
        ranges = plan_epoch(
            self.counts,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            num_ranks=num_ranks,
            rank=rank,
            num_workers=num_workers,
            worker=worker,
        )
        stream = self._samples(ranges)
        if self.shuffle:
            rng = random.Random(f"{self.seed}/{epoch}/{rank}/{worker}")
            stream = _buffer_shuffle(stream, self.shuffle_buffer, rng)
        for i, (index, sample) in enumerate(stream):
            if i >= skip:
                yield self._decode(index, sample, epoch)
        if info is None:
            self._active = None

    def _samples(self, ranges: list[tuple[int, int, int]]) -> Iterator[tuple[int, dict]]:
        for shard, start, stop in ranges:
            url, seen = self.urls[shard], 0
            data = _fetch(url, self.remote_wait_s)
            check_shard(data, self.infos[shard], url)
            try:
                for _, sample in tar_samples(io.BytesIO(data)):
                    if seen >= start:
                        yield self.offsets[shard] + seen, sample
                    seen += 1
                    if seen >= stop:
                        break
            except (EOFError, ValueError) as e:
                raise DataError(f"{url}: not a readable tar ({e})") from None
            if seen < stop:
                raise DataError(f"{url}: {seen} samples, the index says {self.counts[shard]}")

    def _decode(self, index: int, sample: dict, epoch: int) -> dict[str, Any]:
        flip = flip_of(self.seed, epoch, index) if self.hflip else 0
        arrays = {}
        for name, (dtype, shape, header) in self._arrays.items():
            data = sample[f"{name}.npy"]
            if data.startswith(header) and len(data) == len(header) + dtype.itemsize * math.prod(shape):
                arrays[name] = np.frombuffer(data, dtype, math.prod(shape), len(header)).reshape(shape)
            else:  # written by another numpy: parse the header (never unpickling)
                arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
        mean, logvar = posterior_of(arrays, self._record, flip)
        out = {"mean": torch.from_numpy(mean), "logvar": torch.from_numpy(logvar)}
        if self.image is not None:
            data = sample.get(self.image.wds_field)
            if data is None:
                raise DataError(
                    f"{self.root}: sample {index} has no {self.image.wds_field}, dataset.json says the "
                    f"shards keep images"
                )
            out["image"] = torch.from_numpy(flipped(self.image.decode(data), flip))
        return {**out, "label": int(sample["cls"]), "index": index}


def open_dataset(
    root: str,
    meta: dict,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    hflip: bool,
    local: str | None,
    shuffle_buffer: int,
    image: ImageColumn | None = None,
    remote_wait_s: float = 600.0,
    **streaming_kwargs: Any,
) -> LatentWdsDataset:
    """The "wds" format's reader (`ditscale.data.build_dataset`): tars listed by the root's wds_index.json,
    read where they are (no cache: `local` is MDS's; the batch size is the DataLoader's)."""
    if streaming_kwargs:
        raise ValueError(f"webdataset reader takes no streaming options: {sorted(streaming_kwargs)}")
    _, index = read_index(root, WDS_INDEX)
    return LatentWdsDataset(
        root,
        meta,
        index["shards"],
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        hflip=hflip,
        image=image,
        remote_wait_s=remote_wait_s,
    )


def _fetch(url: str, remote_wait_s: float) -> bytes:
    """A whole shard: a local file, a remote one streamed by webdataset's gopen (http(s)://, gs://,
    pipe:…) or, for the other schemes streaming supports (s3://, oci://, azure://, …), fetched whole,
    waiting out an unreachable store for `remote_wait_s` seconds."""
    try:
        if not is_remote(url):
            with open(local_path(url), "rb") as f:
                return f.read()
        from webdataset.gopen import gopen, gopen_schemes

        if url.split(":", 1)[0] in gopen_schemes:
            with gopen(url, "rb") as f:
                return f.read()
        return patiently(
            lambda: read_bytes(url),
            url,
            remote_wait_s,
            say=lambda m: print(f"[ditscale.data] {m}", file=sys.stderr, flush=True),
        )
    except OSError as e:
        raise DataError(f"{url}: cannot be read ({e})") from None


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header numpy writes for an array of `dtype` and `shape` (data_prep's record columns)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(shape, dtype), allow_pickle=False)
    return buf.getvalue()[: -dtype.itemsize * math.prod(shape)]


def _buffer_shuffle(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle of a stream through a buffer of `size` items."""
    buf = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf
