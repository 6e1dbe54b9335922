"""The MDS reader's local cache, keyed by content: a re-encoded dataset is never served from an old cache.

A cache directory belongs to one index: `content_cache_dir(root, index)` names it after the dataset's
path and `index_key(index)` (which changes with any shard's hash), and `claim_cache` makes a given
directory (`data.cache`, or the default) hold exactly that index. A cache whose marker names another
dataset or another index (stale after re-encoding in place, or foreign) has its index and shard files
removed and is filled again; the dataset's own index.json is copied in, so streaming never reads a
stale copy. The readers' per-shard hash check (ditscale.data.integrity) covers what is left: a cached
shard that does not match its hash is fetched again once, then refused.
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

from ditscale.data.integrity import index_key
from ditscale.data.schema import MDS_INDEX
from ditscale.files import atomic_write

CACHE_MARKER = "ditscale-cache.json"
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


def claim_cache(local: str, root: str, index: bytes) -> bool:
    """Make `local` the cache of `root` with exactly this index (bytes of its index.json); True when an
    older or foreign cache was found there and cleared. Safe when the ranks of a node call it together."""
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
            return False
        stale = bool(_clear(local)) or have is not None
        if stale:
            logging.getLogger(__name__).warning(
                f"data cache {local} held {have or 'unmarked files'}, not {want}: cleared, refilling"
            )
        atomic_write(os.path.join(local, MDS_INDEX), index, durable=False)
        atomic_write(marker, json.dumps(want), durable=False)
    return stale


def _same_file(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False
