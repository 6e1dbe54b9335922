"""Files the project writes: created with the user's umask, like any file `open()` creates, and whole or
absent (`atomic_write`).

safetensors >= 0.8 writes through a temporary file that it renames into place, and that temporary file
is always mode 0600: EMA shards and exported weights would be readable by their owner alone, while
DeepSpeed's files beside them follow the umask (0644 under 022), so teammates could not export or sample
a shared run. Every safetensors file goes through `save_safetensors`; `follow_umask` fixes the files a
library wrote the same way (diffusers' save_pretrained).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import BinaryIO, Callable


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore (not thread-safe, brief)
    os.umask(mask)
    return mask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give each file the mode a newly created file gets: 0666 minus the umask."""
    mode = 0o666 & ~current_umask()
    for p in paths:
        os.chmod(p, mode)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors.torch.save_file, with the file's mode set from the umask (see the module docstring)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    follow_umask(path)
    return Path(path)


def fsync_path(path: str | Path) -> None:
    """fsync a file or directory (a directory: so a rename or create in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], object], *, durable: bool = True) -> Path:
    """Write `path` so that readers see the old file or the whole new one, never a part: into a temporary
    file beside it, then renamed over it. `data`: bytes, text (UTF-8) or a function writing to the open
    binary file (np.savez, torch.save, ...). durable: fsync the file before and the directory after the
    rename (a crash then keeps the new file).

    The file is created with mode 0o666 minus the umask, as open() would (not mkstemp's 0600): files of a
    group-shared run directory stay readable to the group. The temporary name (hidden, host and process in
    it) lets several ranks write the same path at once (the last rename wins); it is removed on error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return path
