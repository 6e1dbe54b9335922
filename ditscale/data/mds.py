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

import mmap
import os
import struct
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from ditscale.data.flip import flip_of
from ditscale.data.schema import mds_columns

# Attributes that belong to one process: StreamingDataset creates its locks, threads and events lazily,
# and a DataLoader worker forked after the parent iterated would inherit dead threads and a FileLock
# that refuses to work across fork. They are dropped on fork (and on pickling for spawn).
_PER_PROCESS = ("_executor", "_event", "_iterator", "_cache_filelock", "_maps", "_pid")


class _Layout:
    """Byte offsets of mean / logvar / label inside one MDS sample of a shard."""

    def __init__(self, names: list[str], encodings: list[str], sizes: list[int | None],
                 expected: dict[str, str], where: str):
        got = dict(zip(names, encodings))
        for name, enc in expected.items():
            if got.get(name) != enc:
                raise ValueError(f"{where}: column '{name}' is {got.get(name)!r}, expected {enc!r} "
                                 f"(does dataset.json match the shards?)")
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


class LatentMDSDataset(StreamingDataset):
    """Items `{"mean": (C, h, w) fp16, "logvar": (C, h, w) fp16, "label": int, "index": int}`.

    The flip is `flip_of(shuffle_seed, epoch, index)`; shuffle_seed comes back with a loaded state
    dict, so a resumed run shows every sample with the same flip. `record(index)` returns the stored
    record (both flips, label, source key).
    """

    def __init__(self, *, metadata: dict, hflip: bool = True, **streaming_kwargs: Any):
        super().__init__(**streaming_kwargs)
        self.metadata, self.hflip = metadata, hflip
        c, s = metadata["latent_channels"], metadata["latent_size"]
        self._shape = (c, s, s)
        self._plane = c * s * s                 # fp16 elements of one flip
        self._columns = {k: v for k, v in mds_columns(c, s).items() if k != "key"}
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
        return super().__iter__()

    def _get_work(self, epoch: int, sample_in_epoch: int):
        self._epoch = epoch     # the epoch this process is iterating, for the flip
        return super()._get_work(epoch, sample_in_epoch)

    # --- reading ----------------------------------------------------------------------------------

    def _layout(self, shard_id: int) -> _Layout:
        layout = self._layouts.get(shard_id)
        if layout is None:
            shard = self.shards[shard_id]
            layout = _Layout(shard.column_names, shard.column_encodings, shard.column_sizes,
                             self._columns, where=shard.raw_data.basename)
            self._layouts[shard_id] = layout
        return layout

    def _map(self, shard_id: int) -> mmap.mmap:
        maps = self.__dict__.setdefault("_maps", {})
        mm = maps.get(shard_id)
        if mm is None:
            shard = self.shards[shard_id]
            filename = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
            try:
                f = open(filename, "rb")
            except FileNotFoundError:
                self.prepare_shard(shard_id)    # download / decompress into the local cache
                f = open(filename, "rb")
            with f:
                mm = maps[shard_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        index = int(sample_id)
        flip = flip_of(self.shuffle_seed, self._epoch, index) if self.hflip else 0
        if self.cache_limit:    # shards may be evicted under us: take streaming's guarded path
            rec = super().get_item(index, retry)
            return self._item(rec["mean"][flip], rec["logvar"][flip], rec["label"], index)
        shard_id, j = self.spanner[index]
        layout, mm = self._layout(shard_id), self._map(shard_id)
        begin, = struct.unpack_from("<I", mm, 4 + 4 * j)
        header = struct.unpack_from(f"<{layout.num_var}I", mm, begin) if layout.num_var else ()
        plane_bytes = 2 * self._plane
        out = []
        for name in ("mean", "logvar"):
            at = begin + layout.offset(name, header) + flip * plane_bytes
            out.append(np.frombuffer(mm, np.float16, self._plane, at).reshape(self._shape))
        label, = struct.unpack_from("<q", mm, begin + layout.offset("label", header))
        return self._item(out[0], out[1], label, index)

    @staticmethod
    def _item(mean: np.ndarray, logvar: np.ndarray, label: int, index: int) -> dict[str, Any]:
        return {"mean": torch.from_numpy(np.array(mean)), "logvar": torch.from_numpy(np.array(logvar)),
                "label": int(label), "index": index}

    def record(self, index: int) -> dict[str, Any]:
        """The stored record: mean/logvar (2, C, h, w) fp16 (0 = image, 1 = mirror), label, key."""
        return super().get_item(int(index))
