"""The MDS reader's local cache, keyed by content: a re-encoded dataset is never served from an old cache.

A cache directory belongs to one index: `content_cache_dir(root, index)` names it after the dataset's
path and `index_key(index)` (which changes with any shard's hash), and `claim_cache` makes a given
directory (`data.cache`, or the default) hold exactly that index. A cache whose marker names another
dataset or another index (stale after re-encoding in place, or foreign) has its index and shard files
removed and is filled again; the dataset's own index.json is copied in, so streaming never reads a
stale copy. The readers' per-shard hash check (ditscale.data.integrity) covers what is left: a cached
shard that does not match its hash is fetched again once, then refused.

Every process that reads a cache holds a shared lock on its `.ditscale-cache.in-use` file until it exits
(forked loader workers share it). A cache that must be cleared while another live process holds that lock
(two jobs on one node with one `data.cache` and different datasets) is refused with DataError, instead of
removing the files under the other job's reader.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager

from ditscale.data.integrity import DataError, index_key
from ditscale.data.schema import MDS_INDEX
from ditscale.files import atomic_write

CACHE_MARKER = "ditscale-cache.json"
IN_USE = ".ditscale-cache.in-use"
_CACHED_FILE = re.compile(r"^(index\.json(\.tmp)?|.*\.mds(\.[a-z0-9]+)?(\.tmp)?)$")


def content_cache_dir(root: str, index: bytes) -> str:
    """`<base>/<path key>-<index key>` under $DITSCALE_DATA_CACHE or the temp directory: ranks of a node
    share it; re-encoding the dataset in place moves to a fresh directory."""
    base = os.environ.get("DITSCALE_DATA_CACHE") or os.path.join(tempfile.gettempdir(), "ditscale-cache")
    return os.path.join(base, f"{hashlib.sha1(str(root).encode()).hexdigest()[:12]}-{index_key(index)}")


@contextmanager
def _locked(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear(local: str) -> int:
    """Remove the index and shard files (nothing else) under a cache directory; how many were removed."""
    removed = 0
    for dirpath, _, files in os.walk(local):
        for name in files:
            if _CACHED_FILE.match(name):
                os.remove(os.path.join(dirpath, name))
                removed += 1
    return removed


_in_use: dict[str, int] = {}  # cache directory -> this process's descriptor holding its shared in-use lock


def _hold_in_use(local: str) -> None:
    path = os.path.realpath(local)
    if path not in _in_use:
        fd = os.open(os.path.join(path, IN_USE), os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _in_use[path] = fd


def _read_by_others(local: str) -> bool:
    """Whether another live process holds the cache's in-use lock (this process lets go of its own first)."""
    own = _in_use.pop(os.path.realpath(local), None)
    if own is not None:
        os.close(own)
    fd = os.open(os.path.join(local, IN_USE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def claim_cache(local: str, root: str, index: bytes) -> bool:
    """Make `local` the cache of `root` with exactly this index (bytes of its index.json); True when an
    older or foreign cache was found there and cleared. Safe when the ranks of a node call it together.
    DataError when it would have to be cleared while another live process reads it."""
    os.makedirs(local, exist_ok=True)
    want = {"dataset": str(root), "index": index_key(index)}
    marker = os.path.join(local, CACHE_MARKER)
    with _locked(os.path.join(local, ".ditscale-cache.lock")):
        try:
            with open(marker) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = None
        if have == want and _same_file(os.path.join(local, MDS_INDEX), index):
            _hold_in_use(local)
            return False
        if _read_by_others(local):
            raise DataError(
                f"data.cache {local}: it holds {have or 'unmarked files'}, which another live process on this "
                f"node is reading, not {want}; clearing it would remove that job's shards: give this run its "
                f"own data.cache (or leave data.cache unset: the default directory is keyed by the dataset)"
            )
        stale = bool(_clear(local)) or have is not None
        if stale:
            logging.getLogger(__name__).warning(
                f"data cache {local} held {have or 'unmarked files'}, not {want}: cleared, refilling"
            )
        atomic_write(os.path.join(local, MDS_INDEX), index, durable=False)
        atomic_write(marker, json.dumps(want), durable=False)
        _hold_in_use(local)
    return stale


def _same_file(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False
