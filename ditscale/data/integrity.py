"""Shard integrity: the sizes and hashes data_prep records for every shard, checked where bytes are used.

data_prep records each shard's size, sha1 and xxh64 in the dataset's index (MDS: streaming's index.json,
for both the stored zstd file and the decompressed shard; webdataset: wds_index.json). The readers check
`SHARD_HASH` (xxh64, several GB/s) once per process before any sample of a shard is used: the MDS reader
on the decompressed shard it memory-maps (so a flipped byte in the stored file, a stale cache copy or a
bad decompression are all caught), the webdataset reader on the whole tar before parsing it. A mismatch
raises `DataError` naming the dataset's file (not a cache copy); the trainer exits 2 on it.

`shard_problems` checks every recorded hash (sha1 too): `python -m data_prep verify` and
`python -m ditscale.train --check --deep` use it.

For a remote store (issue 17): `check_shard` is what a downloader calls on the fetched bytes, and
`index_key` is the content key of a dataset's cache (ditscale.data.cache).
"""

from __future__ import annotations

import hashlib
import json

import xxhash

SHARD_HASH = "xxh64"


class DataError(ValueError):
    """A dataset file that cannot be used as it is (missing, truncated, corrupt, stale, too small).

    The message names the dataset's file. One string argument, so that a DataLoader worker's DataError
    is raised again as a DataError in the main process."""


def digest(data, algo: str = SHARD_HASH) -> str:
    """Hex digest of a bytes-like object (bytes, memoryview, mmap), as streaming's `get_hash` computes it
    (hashlib's and xxhash's algorithms by name)."""
    if algo in xxhash.algorithms_available:
        return getattr(xxhash, algo)(data).hexdigest()
    if hasattr(hashlib, algo) and not algo.startswith("shake_"):
        return getattr(hashlib, algo)(data).hexdigest()
    raise ValueError(f"{algo} is not a supported hash algorithm")


def shard_problems(data, info: dict, what: str, algos: list[str] | None = None) -> list[str]:
    """Size and hashes of `data` against an index entry {"bytes", "hashes": {algo: hex}}: one line per
    difference, each starting with `what`. algos: which hashes (default: every one recorded)."""
    problems = []
    if len(data) != info.get("bytes", len(data)):
        problems.append(f"{what}: {len(data)} bytes, the index says {info['bytes']}")
        return problems
    hashes = info.get("hashes") or {}
    for algo in sorted(hashes) if algos is None else algos:
        if algo not in hashes:
            problems.append(
                f"{what}: the index records no {algo} hash (recorded: {sorted(hashes) or 'none'}); "
                f"write the dataset with data_prep, which records {SHARD_HASH}"
            )
            continue
        got = digest(data, algo)
        if got != hashes[algo]:
            problems.append(f"{what}: {algo} {got}, the index says {hashes[algo]}")
    return problems


def check_shard(data, info: dict, what: str) -> None:
    """Raise DataError unless `data` has the size and `SHARD_HASH` the index entry `info` records."""
    problems = shard_problems(data, info, what, [SHARD_HASH])
    if problems:
        raise DataError(
            f"{problems[0]}: the shard is corrupt, truncated or was rewritten after the index "
            f"(`python -m data_prep verify` lists every damaged shard)"
        )


def read_index(root: str, name: str) -> tuple[bytes, dict]:
    """(bytes, parsed) of the dataset index `root/name`; DataError naming the file when absent or bad."""
    from ditscale.data.storage import join, read_bytes

    where = join(root, name)
    try:
        data = read_bytes(where)
    except FileNotFoundError:
        raise DataError(f"{where} not found (was `python -m data_prep merge {root}` run?)") from None
    return data, load_index(data, where)


def load_index(data: bytes, where: str) -> dict:
    """A dataset index (index.json / wds_index.json) with its "shards" list; DataError naming `where`."""
    try:
        index = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or not index["shards"]:
        raise DataError(f"{where}: no 'shards' list (is this a data_prep index?)")
    return index


def index_key(data: bytes) -> str:
    """The content key of a dataset's index bytes: it changes whenever any shard's hash does."""
    return hashlib.sha1(data).hexdigest()[:16]
