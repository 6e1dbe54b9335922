"""Sequential reading of the tar shards data_prep writes: ustar members, with pax or GNU long names.

tarfile parses every header field into a TarInfo (~70 µs a member); a sample has three members, so the
webdataset reader spent more time in tar headers than in everything else. Here a header costs a
checksum, a name and a size. Anything else tar can hold (links, directories, global headers) is
skipped; a bad checksum or a short read raises, naming the byte offset.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Iterator

_BLOCK = 512
_ZERO = bytes(_BLOCK)


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _read(stream: BinaryIO, n: int, offset: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"tar truncated at byte {offset + len(data)} (wanted {n} more bytes)")
    return data


def _pax_path(data: bytes) -> str | None:
    """The 'path' record of a pax extended header ("<len> key=value\\n" records)."""
    at = 0
    while at < len(data):
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        at += length
    return None


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file, in archive order."""
    offset, long_name = 0, None
    while True:
        header = stream.read(_BLOCK)
        if not header or header == _ZERO:
            return
        if len(header) != _BLOCK:
            raise EOFError(f"tar truncated at byte {offset + len(header)} (inside a header)")
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + sum(header[156:]) + 8 * 32:
            raise ValueError(f"tar header checksum mismatch at byte {offset}")
        size, kind = _octal(header[124:136]), header[156:157]
        data = _read(stream, size, offset + _BLOCK)
        pad = -size % _BLOCK
        if pad:
            _read(stream, pad, offset + _BLOCK + size)
        offset += _BLOCK + size + pad
        if kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind == b"L":
            long_name = data.rstrip(b"\0").decode()
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None


def tar_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members sharing a key (the path up to the first dot of the file name), as webdataset
    groups them: (key, {extension: bytes})."""
    key, group = None, {}
    for name, data in tar_members(stream):
        dirname, base = os.path.split(name)
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        this = f"{dirname}/{stem}" if dirname else stem
        if this != key and group:
            yield key, group
            group = {}
        key = this
        group[ext] = data
    if group:
        yield key, group
