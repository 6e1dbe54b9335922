"""Local paths and remote URLs (s3://, gs://, oci://, azure://, hf://, …) through streaming's clients."""
from __future__ import annotations

import os
import tempfile
import urllib.parse


def is_remote(path: str) -> bool:
    """True for a URL with a scheme (s3://bucket/x); False for a plain local path."""
    return urllib.parse.urlparse(str(path)).scheme not in ("", "file")


def local_path(path: str) -> str:
    """A local path with any file:// prefix removed."""
    path = str(path)
    return urllib.parse.urlparse(path).path if path.startswith("file://") else path


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URLs alike."""
    root = str(root)
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)]) if parts else root


def read_bytes(path: str, timeout: float = 60.0) -> bytes:
    """The bytes of a local file or a remote object; FileNotFoundError when it is absent."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="ditscale-fetch-") as tmp:
        dest = os.path.join(tmp, "object")
        try:
            CloudDownloader.direct_download(path, dest, timeout)
        except Exception as e:  # each client raises its own kind of "not found"
            raise FileNotFoundError(f"cannot read {path}: {e}") from e
        if not os.path.exists(dest):
            raise FileNotFoundError(f"cannot read {path}")
        with open(dest, "rb") as f:
            return f.read()


def exists(path: str) -> bool:
    """Whether a (small) file or object can be read: used for completion markers."""
    try:
        read_bytes(path)
        return True
    except FileNotFoundError:
        return False

