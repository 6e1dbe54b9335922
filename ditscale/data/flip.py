"""Which mirror a sample shows: a pure function of (seed, epoch, sample index).

Readers call it per item, so a resumed run, another worker count or the other shard format shows the
same flip for the same sample in the same epoch. splitmix64's finalizer makes neighbouring indices and
epochs independent; Python ints keep it exact and it costs about a microsecond.
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def flip_of(seed: int, epoch: int, index: int) -> int:
    """0 = the image, 1 = its horizontal mirror."""
    return _mix(_mix(_mix(int(seed) & _MASK) ^ (int(epoch) & _MASK)) ^ (int(index) & _MASK)) & 1
