"""Shared memory that mosaicml-streaming left behind when its job was killed.

A StreamingDataset registers a numbered prefix and creates /dev/shm/<prefix>_locals, _barrier,
_epoch_data, ... (plus <prefix>_barrier_filelock / _cache_filelock in the temp directory); its atexit
handler removes them, which a kill -9, an OOM kill or a node-wide SLURM kill never runs. The leftovers
hold RAM, and a new job on the node with the same cache directory fails ("Reused local directory").
streaming's own `clean_stale_shared_memory` removes every prefix, including those of other live jobs
on the node. `release_stale_loader_shm` removes a prefix only when no live process holds any of its
segments open or mapped, and only segments owned by this user. Segments are matched by device and inode,
not by name: a process in another mount namespace (a container, or a node of slurm/local_cluster.sh) maps
a segment of the same name in its own /dev/shm, which says nothing about ours.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

SHM_ROOT = Path("/dev/shm")


def _streaming_names() -> tuple[list[str], list[str]]:
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

    return list(SHM_TO_CLEAN), [BARRIER_FILELOCK, CACHE_FILELOCK]


def _segments(shm_root: Path) -> dict[str, list[os.DirEntry]]:
    """This user's streaming segments in shm_root, by prefix ("000003" -> [000003_locals, ...])."""
    names, _ = _streaming_names()
    pattern = re.compile(r"^(\d{6})_(" + "|".join(map(re.escape, names)) + r")$")
    uid, found = os.getuid(), {}
    try:
        entries = list(os.scandir(shm_root))
    except OSError:
        return {}
    for entry in entries:
        m = pattern.match(entry.name)
        try:
            if m and entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == uid:
                found.setdefault(m.group(1), []).append(entry)
        except OSError:
            continue
    return found


def _in_use(shm_root: Path) -> set[tuple[int, int]]:
    """(device, inode) of the files under a path like shm_root that some process we can inspect has open
    or mapped (its shm_root may be another mount namespace's: the identity tells)."""
    root = str(shm_root).rstrip("/") + "/"
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if root in line:  # "start-end perms offset MAJOR:MINOR INODE path"
                        dev, inode = line.split()[3:5]
                        major, minor = dev.split(":")
                        used.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = f"/proc/{pid}/fd/{fd}"
                if os.readlink(link).startswith(root):
                    st = os.stat(link)
                    used.add((st.st_dev, st.st_ino))
        except (OSError, ValueError):  # gone meanwhile, or another user's process (not ours to free)
            continue
    return used


def _identity(entry: os.DirEntry) -> tuple[int, int]:
    st = entry.stat(follow_symlinks=False)
    return st.st_dev, st.st_ino


def release_stale_loader_shm(
    shm_root: str | Path = SHM_ROOT, lock_root: str | Path | None = None, log=None
) -> list[str]:
    """Remove the streaming shared memory (and its file locks) of dead processes: every segment of a
    prefix none of whose segments a live process holds. Safe while other jobs on the node read their own
    datasets (their segments are open). Call before building a dataset; returns the names removed."""
    shm_root = Path(shm_root)
    lock_root = Path(lock_root or tempfile.gettempdir())
    by_prefix = _segments(shm_root)
    if not by_prefix:
        return []
    used = _in_use(shm_root)
    _, locks = _streaming_names()
    removed = []
    for prefix, entries in sorted(by_prefix.items()):
        if any(_identity(e) in used for e in entries):
            continue
        lock_files = [lock_root / f"{prefix}_{name}" for name in locks]
        paths = [Path(e.path) for e in entries]
        for p in paths + [f for f in lock_files if f.is_file() and f.stat().st_uid == os.getuid()]:
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:  # removed by another rank meanwhile
                continue
    if removed and log is not None:
        log(f"released shared memory of a dead data loader: {', '.join(removed)}")
    return removed
