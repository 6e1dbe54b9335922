"""Shard writers for one slice, and the protocol that makes a slice visible only once complete.

A slice is complete when `<out>/<slice>/summary.json` exists, and summary.json is always written last:
- local output: everything is written to `<slice>.partial/`, summary.json included, then the directory
  is renamed into place (atomic on one filesystem);
- remote output (s3://, gs://, … through streaming's uploaders) or `--staging DIR` (e.g. node-local
  disk in front of a shared filesystem): files are written to the staging directory and uploaded
  shard by shard; summary.json is uploaded after everything else.
A crashed slice leaves a `.partial` directory (or a remote prefix without summary.json); the rerun
discards it and encodes the slice again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import shutil
import tempfile
import threading
from typing import Any

import numpy as np

from ditscale.data.image_column import ImageColumn
from ditscale.data.integrity import digest
from ditscale.data.records import POSTERIOR
from ditscale.data.schema import HASHES, SLICE_RE, SUMMARY_JSON, WDS_INDEX, data_format, mds_columns, wds_key
from ditscale.data.storage import exists, is_remote, join, local_path, read_bytes


class SliceOutput:
    """Where a slice's files are written and how the slice is published."""

    def __init__(self, out: str, name: str, staging: str | None = None):
        self.out, self.name = (str(out) if is_remote(out) else local_path(out)), name
        self.final = join(self.out, name)
        self.staged = staging is not None or is_remote(self.out)
        if self.staged:
            base = staging or os.path.join(tempfile.gettempdir(), "data-prep-staging")
            # one folder per output: two datasets encoded on one node never share a slice's staging files
            self.local = os.path.join(base, hashlib.sha1(self.out.encode()).hexdigest()[:12], name)
        else:
            self.local = os.path.join(self.out, name + ".partial")

    def is_complete(self) -> bool:
        return exists(join(self.final, SUMMARY_JSON))

    def read_summary(self) -> dict:
        return json.loads(read_bytes(join(self.final, SUMMARY_JSON)))

    def reset(self) -> None:
        """Forget any earlier, unfinished attempt at this slice (local side)."""
        shutil.rmtree(self.local, ignore_errors=True)

    def uploader(self):
        """streaming's CloudUploader from the staging directory to the final place (None: unstaged)."""
        if not self.staged:
            return None
        from streaming.base.storage.upload import CloudUploader

        os.makedirs(self.local, exist_ok=True)
        return CloudUploader.get((self.local, self.final), keep_local=False, exist_ok=True)

    def publish(self, files: dict[str, bytes]) -> None:
        """Write `files` (summary.json last) and make the slice visible as complete."""
        names = sorted(files, key=lambda n: n == SUMMARY_JSON)
        if self.staged:
            up = self.uploader()
            for name in names:
                with open(os.path.join(self.local, name), "wb") as f:
                    f.write(files[name])
                up.upload_file(name)
            shutil.rmtree(self.local, ignore_errors=True)
            with contextlib.suppress(OSError):  # the output's staging folder, once its last slice is out
                os.rmdir(os.path.dirname(self.local))
            return
        for name in names:
            with open(os.path.join(self.local, name), "wb") as f:
                f.write(files[name])
                f.flush()
                os.fsync(f.fileno())
        if os.path.exists(self.final):  # an old incomplete copy (no summary.json) in the way
            shutil.rmtree(self.final)
        os.rename(self.local, self.final)


def other_slicings(out: str, num_slices: int) -> list[str]:
    """Slice directories under a local `out` that belong to another --num-slices (remote: not checked)."""
    if is_remote(out) or not os.path.isdir(local_path(out)):
        return []
    names = (n.removesuffix(".partial") for n in os.listdir(local_path(out)))
    return sorted({n for n in names if SLICE_RE.match(n) and not n.endswith(f"-of-{num_slices:05d}")})


def file_info(path: str, basename: str, samples: int) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    return {
        "basename": basename,
        "samples": samples,
        "bytes": len(data),
        "hashes": {algo: digest(data, algo) for algo in HASHES},
    }


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class MdsSliceWriter:
    """MDSWriter: shards with sha1 + xxh64 per shard, the slice's index.json. compression: streaming's codec
    name (zstd, zstd:N), "none", or "auto": zstd for posteriors, none for pixels (photographs' pixels
    shrink by a fifth under zstd at three times the cost of writing them: bench/RESULTS.md)."""

    def __init__(
        self,
        output: SliceOutput,
        latent_channels: int,
        latent_size: int,
        shard_size: int,
        image: ImageColumn | None = None,
        record: str = POSTERIOR,
        compression: str = "auto",
    ):
        from streaming import MDSWriter  # imported here: `import streaming` costs seconds (it imports transformers)

        out = (output.local, output.final) if output.staged else output.local
        self.writer = MDSWriter(
            out=out,
            columns=mds_columns(latent_channels, latent_size, image is not None, record),
            compression=_mds_codec(compression, record),
            hashes=HASHES,
            size_limit=shard_size,
            keep_local=False,
        )

    def write(self, arrays: dict[str, np.ndarray], label: int, key: str, image: bytes | None) -> None:
        record = {**arrays, "label": int(label), "key": key}
        self.writer.write(record if image is None else {**record, "image": image})

    def finish(self) -> list[dict[str, Any]]:
        self.writer.finish()
        shards = []
        for s in self.writer.shards:
            stored = s["zip_data"] or s["raw_data"]
            shards.append(
                {
                    "basename": stored["basename"],
                    "samples": s["samples"],
                    "bytes": stored["bytes"],
                    "hashes": stored["hashes"],
                }
            )
        return shards


def _mds_codec(compression: str, record: str) -> str | None:
    if compression == "auto":
        return "zstd" if record == POSTERIOR else None
    return None if compression == "none" else compression


class WdsSliceWriter:
    """webdataset ShardWriter: uncompressed tars (`<column>.npy` per array column: mean.npy and
    logvar.npy, or pixels.npy; cls, __key__, optionally image.png | image.jpg), the slice's wds_index.json
    with per-shard sample counts and hashes."""

    def __init__(
        self,
        output: SliceOutput,
        latent_channels: int,
        latent_size: int,
        shard_size: int,
        image: ImageColumn | None = None,
        record: str = POSTERIOR,
        compression: str = "auto",
    ):
        if compression not in ("auto", "none"):
            raise ValueError(f"--compression {compression}: webdataset tars are written uncompressed")
        from webdataset import ShardWriter

        self.output, self.shards, self.count = output, [], 0
        self.image_field = image.wds_field if image is not None else None
        os.makedirs(output.local, exist_ok=True)
        self.upload = output.uploader()
        pattern = os.path.join(output.local, "shard-%06d.tar")
        self.writer = ShardWriter(
            pattern,
            maxcount=10**9,
            maxsize=shard_size,
            post=self._closed,
            verbose=0,
            encoder=False,
            mtime=0,
            format="PAX_FORMAT",
        )

    def _closed(self, path: str) -> None:
        basename, count = os.path.basename(path), self.count
        self.count = 0
        if count == 0:
            os.remove(path)
            return
        self.shards.append(file_info(path, basename, count))
        if self.upload is not None:
            self.upload.upload_file(basename)

    def write(self, arrays: dict[str, np.ndarray], label: int, key: str, image: bytes | None) -> None:
        sample = {
            "__key__": wds_key(key),
            **{f"{name}.npy": npy_bytes(a) for name, a in arrays.items()},
            "cls": str(int(label)).encode(),
        }
        if image is not None:
            sample[self.image_field] = image
        self.writer.write(sample)
        self.count += 1

    def finish(self) -> list[dict[str, Any]]:
        self.writer.close()
        with open(os.path.join(self.output.local, WDS_INDEX), "w") as f:
            json.dump({"version": 1, "shards": self.shards}, f)
        if self.upload is not None:
            self.upload.upload_file(WDS_INDEX)
        return self.shards


def open_slice_writer(
    fmt: str,
    output: SliceOutput,
    latent_channels: int,
    latent_size: int,
    shard_size: int,
    image: ImageColumn | None = None,
    record: str = POSTERIOR,
    compression: str = "auto",
):
    """The registered writer of format `fmt` (`ditscale.data.schema.FORMATS`) for one slice; `record`
    and `compression` are the record kind (records.py) and `--compression` as given."""
    writer = data_format(fmt, "--format").load("writer")
    return writer(output, latent_channels, latent_size, shard_size, image, record, compression)


class BackgroundWriter:
    """Runs a slice writer in a thread, so serialising, compressing and uploading overlap encoding.
    An error in the thread is raised by the next `put` or by `finish`."""

    _DONE = object()

    def __init__(self, writer, depth: int = 8):
        self.writer, self.error = writer, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="data-prep-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is self._DONE:
                return
            if self.error is not None:
                continue
            try:
                arrays, labels, keys, images = batch
                for i, (label, key) in enumerate(zip(labels, keys)):
                    one = {name: a[i] for name, a in arrays.items()}
                    self.writer.write(one, label, key, images[i] if images is not None else None)
            except BaseException as e:  # handed to the main thread
                self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error

    def put(
        self,
        arrays: dict[str, np.ndarray],
        labels: list[int],
        keys: list[str],
        images: list[bytes] | None = None,
    ) -> None:
        """One batch: arrays, the record's columns with a leading batch axis (records.py: mean/logvar
        (n, 2, C, h, w) fp16, or pixels (n, H, W, C) uint8); images: the encoded image column, or None."""
        self._check()
        self.queue.put((arrays, labels, keys, images))

    def abort(self) -> None:
        """Stop after the batches already queued, without finishing the shards."""
        self.error = self.error or RuntimeError("aborted")
        self.queue.put(self._DONE)
        self.thread.join()

    def finish(self) -> list[dict[str, Any]]:
        self.queue.put(self._DONE)
        self.thread.join()
        self._check()
        return self.writer.finish()
