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

Registering a prefix: streaming (0.13) has every rank find the first free number, then a job-wide barrier,
then the node's leader creates <prefix>_locals. Two jobs starting on one node inside that window pick
the same number and the later one dies (FileExistsError: '/00000N_locals'). `register_prefix`, which
`use_node_lock()` puts in its place, lets each node's leader find and create in one step under a lock in
/dev/shm (shared by exactly the processes that share the prefixes) and hands the number to the node's
other ranks with one all-gather: no collective ever runs while the lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from pathlib import Path

SHM_ROOT = Path("/dev/shm")
LOCK_NAME = "ditscale-streaming-prefix.lock"


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
    with node_lock(shm_root):
        removed = _release(shm_root, lock_root)
    if removed and log is not None:
        log(f"released shared memory of a dead data loader: {', '.join(removed)}")
    return removed


def _release(shm_root: Path, lock_root: Path) -> list[str]:
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
    return removed


# ----------------------------------------------------------------------------------------------------------
# Registering a prefix
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def node_lock(shm_root: str | Path = SHM_ROOT):
    """An exclusive flock on shm_root/LOCK_NAME (the temp directory where there is no /dev/shm). Any user
    may take it: a file another user created is locked through a read-only descriptor."""
    root = Path(shm_root) if Path(shm_root).is_dir() else Path(tempfile.gettempdir())
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _free_prefix(streams_local, streams_remote, shm_root: Path) -> int:
    """The first prefix with no segment in shm_root and no file lock in the temp directory. Reads another
    dataset's _locals as a file, where streaming attaches every segment it passes and never detaches (its
    reader would then hold other jobs' segments, so that they are never released). ValueError as
    streaming's: a local directory of a remote stream that the segments of a prefix without file locks
    (a dataset whose job died) still name."""
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import prefix as sp

    _, locks = _streaming_names()
    temp = Path(tempfile.gettempdir())
    prefix = 0
    while True:
        if any((temp / sp._get_path(prefix, lock)).exists() for lock in locks):  # a live dataset: as streaming,
            prefix += 1  # its directories are not compared (jobs reading one dataset share its cache)
            continue
        if not any((shm_root / sp._get_path(prefix, name)).exists() for name in SHM_TO_CLEAN):
            return prefix
        try:
            theirs, _ = sp._unpack_locals((shm_root / sp._get_path(prefix, LOCALS)).read_bytes())
        except (OSError, ValueError):
            theirs = []
        reused = [d for d, remote in zip(streams_local, streams_remote) if remote is not None and d in theirs]
        if reused:
            raise ValueError(
                f"Reused local directory: {reused} is named by the shared memory of prefix {prefix}, a dataset "
                f"without file locks (a job that died while its segments are still held, or one starting); give "
                f"this one another cache directory (data.cache)"
            )
        prefix += 1


def register_prefix(streams_local, streams_remote, world, retry: int = 100, shm_root: str | Path = SHM_ROOT):
    """streaming's `get_shm_prefix` (same arguments and result: (prefix int, the _locals SharedMemory)),
    with the node leader's find + create under `node_lock` and the number shared by an all-gather."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS, TICK
    from streaming.base.shared import prefix as sp
    from streaming.base.shared.memory import SharedMemory

    shm_root = Path(shm_root)
    sp._check_self(streams_local)
    mine: tuple[int, str] | None = None  # a node leader's (prefix, "") or (-1, its error)
    if world.is_local_leader:
        try:
            for attempt in range(retry + 1):  # as streaming: a dataset that just ended may still be listed
                try:
                    with node_lock(shm_root):
                        prefix = _free_prefix(streams_local, streams_remote, shm_root)
                        data = sp._pack_locals(streams_local, prefix)
                        shm = SharedMemory(sp._get_path(prefix, LOCALS), True, len(data))
                        shm.buf[: len(data)] = data
                    break
                except ValueError:
                    if attempt == retry:
                        raise
                    time.sleep(TICK)
            mine = (prefix, "")
        except (ValueError, OSError) as e:
            mine = (-1, f"{type(e).__name__}: {e}")
    if dist.is_available() and dist.is_initialized():
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (world.node, mine))
        leaders = {node: got for node, got in every if got is not None}
    else:
        leaders = {world.node: mine}
    prefix, error = leaders[world.node]
    if error:
        kind = ValueError if error.startswith("ValueError") else RuntimeError
        raise kind(f"registering the data loader's shared memory on this node failed: {error}")
    if world.is_local_leader:
        return prefix, shm
    shm = SharedMemory(sp._get_path(prefix, LOCALS), False)
    if sp._unpack_locals(bytes(shm.buf)) != (list(streams_local), prefix):
        raise RuntimeError(f"shared memory prefix {prefix} does not hold this node leader's local directories")
    return prefix, shm


def use_node_lock() -> None:
    """Make streaming's datasets register their prefix with `register_prefix` where /dev/shm holds the
    segments (Linux; elsewhere streaming's own registration stays). Idempotent."""
    import streaming.base.dataset as sd

    if SHM_ROOT.is_dir():
        sd.get_shm_prefix = register_prefix
