"""Files the project writes are created with the user's umask, like any file `open()` creates.

safetensors >= 0.8 writes through a temporary file that it renames into place, and that temporary file
is always mode 0600: EMA shards and exported weights would be readable by their owner alone, while
DeepSpeed's files beside them follow the umask (0644 under 022), so teammates could not export or sample
a shared run. Every safetensors file goes through `save_safetensors`; `follow_umask` fixes the files a
library wrote the same way (diffusers' save_pretrained).
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)          # elsewhere: the classic read-and-restore (not thread-safe, brief)
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
