"""ditscale.files.atomic_write: whole or absent, the umask's mode (not mkstemp's 0600), no leftovers."""

import os
import stat

import numpy as np
import pytest

from ditscale.files import atomic_write


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode


def test_bytes_text_and_writer_replace_without_leftovers(tmp_path):
    path = tmp_path / "x"
    atomic_write(path, b"one")
    atomic_write(path, "two")
    assert path.read_text() == "two"
    atomic_write(tmp_path / "a.npz", lambda f: np.savez(f, a=np.arange(3)), durable=False)
    assert np.load(tmp_path / "a.npz")["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "x"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x"
    atomic_write(path, b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x"]
