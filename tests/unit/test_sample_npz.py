"""Resumable multi-rank .npz sampling (rank variables: test_runtime.py): chunk ownership, kill/resume without duplicates or gaps,
streamed ADM .npz assembly (read back by numpy and by ditscale.evaluate)."""

import json

import numpy as np
import pytest

from ditscale.evaluate.features import check_image_array, iter_npz_batches, npz_array_info
from ditscale.runtime import RankEnv
from ditscale.sampling.npz import assemble, chunk_path, done_chunks, prepare_dir, run_chunks, write_chunk

N, S = 23, 5  # 5 chunks, the last of 3


def produce(indices, calls=None):
    """Images that encode their sample index (deterministic in the index alone), label = index mod 7."""
    if calls is not None:
        calls.extend(indices)
    idx = np.asarray(indices)
    images = np.broadcast_to((idx % 251).astype(np.uint8)[:, None, None, None], (len(idx), 4, 6, 3)).copy()
    images[:, 0, 0, 0] = idx // 251
    return images, (idx % 7).tolist()


def expected():
    return produce(range(N))


def load(path):
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def test_single_rank_writes_the_adm_npz(tmp_path):
    out = run_chunks(tmp_path, N, S, produce)
    assert out.name == "samples_23x4x6x3.npz"
    images, labels = load(out)
    assert np.array_equal(images, expected()[0]) and labels.tolist() == expected()[1]
    assert labels.dtype == np.int64
    shape, dtype = npz_array_info(out)
    check_image_array(shape, dtype, str(out))
    assert np.array_equal(np.concatenate(list(iter_npz_batches(out, batch_size=7))), images)


def test_ranks_split_the_chunks_and_rank0_assembles(tmp_path):
    calls = {r: [] for r in range(3)}
    for r in (2, 1):  # others finish first
        assert run_chunks(tmp_path, N, S, lambda i, r=r: produce(i, calls[r]), RankEnv(r, 3, 0)) is None
    out = run_chunks(tmp_path, N, S, lambda i: produce(i, calls[0]), RankEnv(0, 3, 0), stall_timeout=5)
    assert calls[0] == [*range(0, 5), *range(15, 20)] and calls[1] == [*range(5, 10), *range(20, 23)]
    assert calls[2] == list(range(10, 15))
    images, labels = load(out)
    assert np.array_equal(images, expected()[0]) and labels.tolist() == expected()[1]


def test_resume_redoes_only_the_missing_chunks_on_any_world_size(tmp_path):
    run_chunks(tmp_path, N, S, produce)
    reference = load(next(tmp_path.glob("samples_*.npz")))
    for path in [next(tmp_path.glob("samples_*.npz")), chunk_path(tmp_path, 1), chunk_path(tmp_path, 4)]:
        path.unlink()  # "killed" before these
    chunk_path(tmp_path, 4).with_suffix(".npz.tmp").write_bytes(b"half-written")  # a kill mid-write
    calls = []
    assert run_chunks(tmp_path, N, S, lambda i: produce(i, calls), RankEnv(1, 2, 0)) is None
    out = run_chunks(tmp_path, N, S, lambda i: produce(i, calls), RankEnv(0, 2, 0), stall_timeout=5)
    assert sorted(calls) == [*range(5, 10), *range(20, 23)]  # nothing twice
    again = load(out)
    assert all(np.array_equal(a, b) for a, b in zip(reference, again))


def test_rank0_gives_up_when_a_rank_stalls(tmp_path):
    with pytest.raises(RuntimeError, match=r"no new chunk for 0.3 s; 2 missing \(first \[1, 3\]\)"):
        run_chunks(tmp_path, N, S, produce, RankEnv(0, 2, 0), stall_timeout=0.3)
    assert done_chunks(tmp_path, 5) == {0, 2, 4}


def test_assemble_checks_chunk_contents(tmp_path):
    for j, start in enumerate(range(0, N, S)):
        span = range(start, min(start + S, N))
        write_chunk(tmp_path, j, *produce(span), span)
    write_chunk(tmp_path, 2, *produce(range(11, 16)), range(11, 16))  # wrong indices for chunk 2
    with pytest.raises(ValueError, match=r"000002\.npz: holds indices \[11, 12, 13\].*Delete it and rerun"):
        assemble(tmp_path, N, S)
    chunk_path(tmp_path, 3).unlink()
    with pytest.raises(ValueError, match=r"1 chunk\(s\) missing \(first \[3\]\)"):
        assemble(tmp_path, N, S)


def test_manifest_keeps_settings_and_first_chunk_size(tmp_path):
    settings = {"seed": 0, "cfg_scale": 1.5, "guide_channels": 3, "scale_factor": [0.2, 0.3]}
    assert prepare_dir(tmp_path, settings, 64) == 64
    assert prepare_dir(tmp_path, dict(settings), 32) == 64  # batch size may change
    assert json.loads((tmp_path / "manifest.json").read_text())["chunk_size"] == 64
    with pytest.raises(ValueError, match=r"other settings \(cfg_scale: was 1\.5, now 4\.0\)"):
        prepare_dir(tmp_path, {**settings, "cfg_scale": 4.0}, 64)
