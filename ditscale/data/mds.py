"""Reader of data_prep's MDS shards: a StreamingDataset that yields one flip of each posterior.

StreamingDataset keeps what makes it worth using (deterministic elastic shuffle, shard download and
cache, mid-epoch resume through `state_dict` / `load_state_dict`); only the per-sample read is
replaced. The stock read opens the shard file and parses every column's encoding string for each
sample; here each shard is memory-mapped once per process and a sample is a few struct reads at offsets
fixed by the static column shapes, reading only the chosen flip (bench/loader_bench.py: several times
the stock read; ≥ 2,600 samples/s per DataLoader worker on a loaded 2-core box).

Resume (LatentDataLoader / StreamingDataLoader `state_dict()` saved with the model, `load_state_dict()`
before iterating): the state counts samples handed to the trainer over all ranks (not those prefetched).
- Same ranks, per-rank batch size and DataLoader workers: the batches after the resume are exactly
  those of the uninterrupted run (tests/unit/test_data_reader.py checks it with 0 and 2 workers).
- Other rank / node counts: streaming's elastic determinism keeps the global sample order
  (num_canonical_nodes and the seed travel in the state), so the epoch goes on with no sample lost or
  repeated, but which rank sees which sample changes.
- Flips are a function of (seed, epoch, index), so they survive either way; ε is the trainer's.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataset

from ditscale.data.cache import claim_cache, content_cache_dir
from ditscale.data.flip import flip_of
from ditscale.data.image_column import ImageColumn, flipped
from ditscale.data.integrity import DataError, check_shard, read_index
from ditscale.data.records import as_posterior, columns, posterior_of, record_kind
from ditscale.data.schema import DATASET_JSON, MDS_INDEX, mds_columns
from ditscale.data.shm import use_node_lock
from ditscale.data.storage import classify, is_remote, join, local_path, patiently

# Attributes that belong to one process: StreamingDataset creates its locks, threads and events lazily,
# and a DataLoader worker forked after the parent iterated would inherit dead threads and a FileLock
# that refuses to work across fork. They are dropped on fork (and on pickling for spawn).
_PER_PROCESS = ("_executor", "_event", "_iterator", "_cache_filelock", "_maps", "_pid", "_failure", "_checked")


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
) -> "LatentMDSDataset":
    """The "mds" format's reader (`ditscale.data.build_dataset`): shards cached under `local` (default:
    `content_cache_dir`, keyed by the index's content), read in place when `local` is the dataset root;
    a cache holding another index is cleared first (`claim_cache`). A fetch that cannot reach the store
    is retried for `remote_wait_s` seconds (`PatientStream`). shuffle_buffer is webdataset's."""
    index, _ = read_index(root, MDS_INDEX)
    remote: str | None = root if is_remote(root) else os.path.abspath(local_path(root))
    local = local or content_cache_dir(remote, index)
    if os.path.abspath(local) == remote:
        remote = None
    else:
        claim_cache(local, remote, index)
    stream_keys = ("download_retry", "download_timeout", "validate_hash", "keep_zip")
    stream = PatientStream(
        remote=remote,
        local=local,
        remote_wait_s=remote_wait_s,
        **{k: streaming_kwargs.pop(k) for k in stream_keys if k in streaming_kwargs},
    )
    try:
        return LatentMDSDataset(
            metadata=meta,
            source=root,
            streams=[stream],
            shuffle=shuffle,
            shuffle_seed=seed,
            batch_size=batch_size,
            hflip=hflip,
            image=image,
            **streaming_kwargs,
        )
    except ValueError as e:
        if "cache limit" in str(e).lower():  # streaming wants room for 4 of the largest shards
            raise DataError(f"data.cache_limit: {e}") from None
        raise


class PatientStream(Stream):
    """streaming's Stream whose downloads outlast an outage of the store: a fetch that fails because the
    store cannot be reached (or answers 5xx) is retried with back-off for `remote_wait_s` seconds, then
    fails with a RemoteError naming the endpoint and the object. boto3 writes a download to a temporary
    file and renames it when complete, so an interrupted fetch never leaves a partial shard."""

    def __init__(self, *, remote_wait_s: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.remote_wait_s = remote_wait_s

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        url = join(self.remote or "", self.split or "", from_basename)

        def fetch() -> str:
            try:
                return super(PatientStream, self)._download_file(from_basename, to_basename)
            except Exception as e:
                if not is_remote(url):
                    raise
                raise classify(url, e) from e

        return patiently(fetch, url, self.remote_wait_s, say=_say)


def _say(message: str) -> None:
    print(f"[ditscale.data] {message}", file=sys.stderr, flush=True)


class _Layout:
    """Byte offsets of mean / logvar / label inside one MDS sample of a shard."""

    def __init__(
        self, names: list[str], encodings: list[str], sizes: list[int | None], expected: dict[str, str], where: str
    ):
        got = dict(zip(names, encodings))
        for name, enc in expected.items():
            if got.get(name) != enc:
                raise ValueError(
                    f"{where}: column '{name}' is {got.get(name)!r}, expected {enc!r} "
                    f"(does dataset.json match the shards?)"
                )
        self.num_var = sum(size is None for size in sizes)
        self.offsets: dict[str, tuple[int, list[int]]] = {}  # name -> (static bytes, variable columns before)
        static, var_before = 4 * self.num_var, []
        for name, size in zip(names, sizes):
            self.offsets[name] = (static, list(var_before))
            if size is None:
                var_before.append(len(var_before))
            else:
                static += size

    def offset(self, name: str, header: tuple[int, ...]) -> int:
        static, var = self.offsets[name]
        return static + sum(header[i] for i in var)

    def variable_span(self, name: str, header: tuple[int, ...]) -> tuple[int, int]:
        """(offset, size) of a variable-size column."""
        return self.offset(name, header), header[len(self.offsets[name][1])]


class LatentMDSDataset(StreamingDataset):
    """Items `{"mean": (C, h, w) fp16, "logvar": (C, h, w) fp16, "label": int, "index": int}`, from a
    posterior or a pixels record (records.py).

    The flip is `flip_of(shuffle_seed, epoch, index)`; shuffle_seed comes back with a loaded state
    dict, so a resumed run shows every sample with the same flip. `record(index)` returns the stored
    record (both flips, label, source key).

    Every shard is checked against the index's xxh64 of its decompressed data before its first sample
    is used in a process (ditscale.data.integrity); a cache copy that fails is fetched again once. Any
    failure to fetch, decompress or match raises DataError naming the dataset's file (`source`), also
    when it happened in streaming's download thread.
    """

    def __init__(
        self,
        *,
        metadata: dict,
        source: str,
        hflip: bool = True,
        image: ImageColumn | None = None,
        **streaming_kwargs: Any,
    ):
        use_node_lock()  # streaming's own prefix registration races with other jobs starting on the node
        super().__init__(**streaming_kwargs)
        self.metadata, self.source, self.hflip, self.image = metadata, str(source), hflip, image
        c, s = metadata["latent_channels"], metadata["latent_size"]
        self._size = (c, s)
        self._record = record_kind(metadata, join(str(source), DATASET_JSON))
        self._arrays = columns(self._record, c, s)  # name -> (dtype, shape)
        self._columns = {k: v for k, v in mds_columns(c, s, image is not None, self._record).items() if k != "key"}
        self._layouts: dict[int, _Layout] = {}
        self._epoch = 0

    # --- process hygiene ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in _PER_PROCESS:
            state.pop(name, None)
        return state

    def __iter__(self):
        if self.__dict__.get("_pid") != os.getpid():
            for name in _PER_PROCESS:
                self.__dict__.pop(name, None)
            self._shared_barrier.__dict__.pop("lock", None)
            self._pid = os.getpid()
        self._cache_lock()  # before streaming's fetch threads start: each would create its own
        try:
            yield from super().__iter__()
        except Exception as e:
            self._stop_threads()  # a read failed here: the fetch threads must not go on for it
            failure = self.__dict__.pop("_failure", None)
            if failure is None or isinstance(e, DataError):
                raise
            raise failure from e  # streaming's "Background thread failed": the thread's own error
        failure = self.__dict__.pop("_failure", None)  # streaming's threads stop quietly on an error
        if failure is not None:
            raise failure

    # streaming counts an epoch's threads out as each returns, and waits for them (`_Iterator.exit`) at the
    # end of the epoch and before the next one; a thread that raises is never counted, so the reader would
    # wait forever (two threads fetching the same damaged shard both raise). Here a thread's failure is kept
    # for `__iter__`, every thread is told to stop, and the failed thread is counted out.

    def _prepare_thread(self, it) -> None:
        self._counted_out(super()._prepare_thread, it)

    def _ready_thread(self, it) -> None:
        self._counted_out(super()._ready_thread, it)

    def _counted_out(self, thread, it) -> None:
        try:
            thread(it)
        except Exception as e:
            self.__dict__.setdefault("_failure", e)
            self._stop_threads()
            it.on_exit()

    def _stop_threads(self) -> None:
        event = self.__dict__.get("_event")
        if event is not None:
            event.set()

    def _get_work(self, epoch: int, sample_in_epoch: int):
        self._epoch = epoch  # the epoch this process is iterating, for the flip
        return super()._get_work(epoch, sample_in_epoch)

    # --- reading ----------------------------------------------------------------------------------

    def _layout(self, shard_id: int) -> _Layout:
        layout = self._layouts.get(shard_id)
        if layout is None:
            shard = self.shards[shard_id]
            layout = _Layout(
                shard.column_names,
                shard.column_encodings,
                shard.column_sizes,
                self._columns,
                where=shard.raw_data.basename,
            )
            self._layouts[shard_id] = layout
        return layout

    def dataset_file(self, shard_id: int) -> str:
        """The dataset's own file of a shard (the compressed one when there is one), for messages."""
        shard = self.shards[shard_id]
        return join(self.source, (shard.zip_data or shard.raw_data).basename)

    def _cache_lock(self):
        """streaming's cache file lock, one object per process (thread-local holds: it still excludes the
        fetch threads from each other)."""
        from filelock import FileLock

        if "_cache_filelock" not in self.__dict__:
            self._cache_filelock = FileLock(self._cache_filelock_path)
        return self._cache_filelock

    @property
    def cache_filelock(self):
        """streaming 0.13 asks `hasattr(self, "cache_filelock")` before it makes `_cache_filelock`, a name it
        never sets, so it made a new lock object on every call, from any thread; the lock a failing thread
        held was then not the one left on the dataset. With this the check finds `_cache_lock()`."""
        return self._cache_lock()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's fetch / decompress, with any failure turned into a DataError naming the dataset's
        file and the shard marked absent again (so no one waits for it); in a fetch thread, `_counted_out`
        keeps the error for `__iter__`. streaming's download thread calls this for every sample ahead of the
        reader, and streaming takes its cache file lock before it looks at the shard's state: with no cache
        limit (nothing is ever evicted) a shard whose decompressed file is on local disk (streaming renames it
        into place whole) returns at once, without that lock. LOCAL alone is not enough: it also means "only
        the zip is here"."""
        from streaming.base.dataset import _ShardState

        if (
            not self.cache_limit
            and self._shard_states[shard_id] == _ShardState.LOCAL
            and os.path.isfile(self._local_file(shard_id))
        ):
            return
        lock = self._cache_lock()
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            if lock.is_locked:  # this thread's hold (thread-local): streaming raised inside it (eviction)
                lock.release(force=True)  # else every reader of the cache, on every rank, waits for it forever
            self._forget(shard_id)
            if isinstance(e, DataError):
                raise
            if "no shards present locally to evict" in str(e):
                shard = self.shards[shard_id]
                raise DataError(
                    f"data.cache_limit={self.cache_limit}: too small for {self.dataset_file(shard_id)} "
                    f"({shard.get_max_size()} bytes fetched and decompressed) beside what the cache holds and "
                    f"cannot evict ({self.cache_usage} bytes: the index, shards in use); raise it"
                ) from None
            raise DataError(
                f"{self.dataset_file(shard_id)}: cannot be fetched or decompressed ({type(e).__name__}: {e})"
            ) from e

    def _forget(self, shard_id: int) -> None:
        from streaming.base.dataset import _ShardState

        if self._shard_states[shard_id] == _ShardState.PREPARING:
            self._shard_states[shard_id] = _ShardState.REMOTE

    def _local_file(self, shard_id: int) -> str:
        shard = self.shards[shard_id]
        return os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)

    def _checked_map(self, shard_id: int) -> mmap.mmap:
        """The decompressed shard, memory-mapped, once its size and hash match the index."""
        shard, filename = self.shards[shard_id], self._local_file(shard_id)
        info = {"bytes": shard.raw_data.bytes, "hashes": shard.raw_data.hashes}
        what = self.dataset_file(shard_id) + (" (decompressed)" if shard.zip_data else "")
        for attempt in range(2):
            if not os.path.isfile(filename):
                self.prepare_shard(shard_id)  # download / decompress into the local cache
            try:
                with open(filename, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (FileNotFoundError, ValueError):  # absent, or empty (mmap refuses size 0)
                mm = b""
            try:
                check_shard(mm, info, what)
                return mm
            except DataError:
                derived = self.streams[self.stream_per_shard[shard_id]].remote is not None or shard.zip_data
                if attempt or not derived:
                    raise
                self._drop_copy(shard_id, filename)  # a stale or damaged copy: fetch it again, once
        raise AssertionError("unreachable")

    def _drop_copy(self, shard_id: int, filename: str) -> None:
        from streaming.base.dataset import _ShardState

        shard, stream = self.shards[shard_id], self.streams[self.stream_per_shard[shard_id]]
        copies = [filename]
        if shard.zip_data and stream.remote is not None:  # a cached compressed copy, never the dataset's
            copies.append(os.path.join(stream.local, stream.split or "", shard.zip_data.basename))
        for path in copies:
            if os.path.exists(path):
                os.remove(path)
        self._shard_states[shard_id] = _ShardState.REMOTE

    def _check_cached(self, shard_id: int) -> None:
        """`_checked_map` once per version of the cached file (streaming may evict and fetch it again)."""

        def version():
            try:
                st = os.stat(self._local_file(shard_id))
                return shard_id, st.st_ino, st.st_mtime_ns
            except FileNotFoundError:
                return None

        checked = self.__dict__.setdefault("_checked", set())
        if version() not in checked:
            mm = self._checked_map(shard_id)
            checked.add(version())
            if isinstance(mm, mmap.mmap):
                mm.close()

    def _map(self, shard_id: int) -> mmap.mmap:
        maps = self.__dict__.setdefault("_maps", {})
        mm = maps.get(shard_id)
        if mm is None:
            mm = maps[shard_id] = self._checked_map(shard_id)
        return mm

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        index = int(sample_id)
        flip = flip_of(self.shuffle_seed, self._epoch, index) if self.hflip else 0
        if self.cache_limit:  # shards may be evicted under us: take streaming's guarded path
            self._check_cached(self.spanner[index][0])
            rec = super().get_item(index, retry)
            mean, logvar = posterior_of(rec, self._record, flip)
            return self._item(mean, logvar, rec["label"], index, self._image(rec.get("image"), flip))
        shard_id, j = self.spanner[index]
        layout, mm = self._layout(shard_id), self._map(shard_id)
        (begin,) = struct.unpack_from("<I", mm, 4 + 4 * j)
        header = struct.unpack_from(f"<{layout.num_var}I", mm, begin) if layout.num_var else ()
        arrays = {  # views of the mapped shard
            name: np.frombuffer(mm, dtype, math.prod(shape), begin + layout.offset(name, header)).reshape(shape)
            for name, (dtype, shape) in self._arrays.items()
        }
        mean, logvar = posterior_of(arrays, self._record, flip)
        (label,) = struct.unpack_from("<q", mm, begin + layout.offset("label", header))
        image = None
        if self.image is not None:
            at, size = layout.variable_span("image", header)
            image = self._image(mm[begin + at : begin + at + size], flip)
        return self._item(mean, logvar, label, index, image)

    def _image(self, data, flip: int) -> torch.Tensor | None:
        """The kept image of the chosen flip, (C, H, W) uint8, when the run asked for images."""
        if self.image is None:
            return None
        return torch.from_numpy(flipped(self.image.decode(data), flip))

    @staticmethod
    def _item(
        mean: np.ndarray, logvar: np.ndarray, label: int, index: int, image: torch.Tensor | None = None
    ) -> dict[str, Any]:
        item = {
            "mean": torch.from_numpy(mean),
            "logvar": torch.from_numpy(logvar),
            "label": int(label),
            "index": index,
        }
        return item if image is None else {**item, "image": image}

    def record(self, index: int) -> dict[str, Any]:
        """The stored record (its columns, records.py), with mean/logvar (2, C, h, w) fp16 (0 = image,
        1 = mirror) whatever its kind, label, key."""
        return as_posterior(super().get_item(int(index)), self._record, *self._size)
