"""The readers never hand out bad bytes: every corruption of a shard or index, in both formats, stops the
read with a DataError naming the dataset's file; caches are keyed by content; the trainer's checks refuse
damaged or too small datasets with exit 2."""

import json
import os
import shutil
import signal
import time

import pytest
import torch

from data_prep.testing import write_synthetic_latents
from ditscale.data import DataError, build_dataloader, build_dataset
from ditscale.data.cache import CACHE_MARKER, claim_cache, content_cache_dir
from ditscale.data.check import batches_per_epoch, check_dataset, check_fills_batch
from ditscale.data.integrity import index_key
from ditscale.data.schema import MDS_INDEX, WDS_INDEX
from ditscale.engine.signals import StopRequest, StopWaiting

N = 40


pytestmark = pytest.mark.usefixtures("streaming_shm")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """40 records of (2, 1, 8, 8) in shards of ~10 records, both formats; "mds-raw": MDS uncompressed (pixel
    mode's default)."""
    base = tmp_path_factory.mktemp("integrity")
    made = {
        name: write_synthetic_latents(
            str(base / name),
            N,
            latent_channels=1,
            latent_size=8,
            num_classes=10,
            format=name.split("-")[0],
            shard_size=6000,
            compression="none" if name == "mds-raw" else "auto",
        )
        for name in ("mds", "wds", "mds-raw")
    }
    assert all(s["zip_data"] is None for s in json.load(open(os.path.join(made["mds-raw"], MDS_INDEX)))["shards"])
    return made


def copy_of(pristine, fmt, tmp_path, seed=None) -> str:
    root = str(tmp_path / fmt)
    if seed is None:
        shutil.copytree(pristine[fmt], root)
        return root
    return write_synthetic_latents(
        root, N, latent_channels=1, latent_size=8, num_classes=10, format=fmt, shard_size=6000, seed=seed
    )


def shard_files(root) -> list[str]:
    """The stored shard files, in index order."""
    fmt = json.load(open(os.path.join(root, "dataset.json")))["format"]
    shards = json.load(open(os.path.join(root, MDS_INDEX if fmt == "mds" else WDS_INDEX)))["shards"]
    return [os.path.join(root, (s.get("zip_data") or s.get("raw_data") or s)["basename"]) for s in shards]


def flip_byte(path, at=0.5):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[int(len(data) * at)] ^= 0x40
        f.seek(0)
        f.write(data)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def read_all(root, local=None, workers=None):
    ds = build_dataset(root, batch_size=4, seed=0, shuffle=False, local=local, hflip=False)
    if workers is None:
        return [(int(x["index"]), x["mean"].clone()) for x in ds]
    return [
        (int(i), m)
        for b in build_dataloader(ds, batch_size=4, num_workers=workers)
        for i, m in zip(b["index"], b["mean"].clone())
    ]


# --- damaged shards and indexes: DataError naming the dataset's file ---------------------------------


@pytest.mark.parametrize(
    "fmt,where,damage",
    [
        ("mds", "cache", flip_byte),
        ("mds", "in place", flip_byte),
        ("mds", "cache", truncate),
        ("mds-raw", "cache", flip_byte),
        ("mds-raw", "in place", flip_byte),
        ("mds-raw", "cache", truncate),
        ("wds", None, flip_byte),
        ("wds", None, truncate),
    ],
)
def test_damaged_shard_stops_the_read_naming_it(pristine, tmp_path, fmt, where, damage):
    root = copy_of(pristine, fmt, tmp_path)
    bad = shard_files(root)[1]
    damage(bad)
    local = {"cache": str(tmp_path / "cache"), "in place": root, None: None}[where]
    with pytest.raises(DataError) as e:
        read_all(root, local)
    assert bad in str(e.value) and "cache" not in str(e.value)


@pytest.mark.timeout(180)  # the race this once hung in (both fetch threads raising) now fails here, not at 600 s
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [None, 1])
def test_a_cache_limit_too_small_for_the_index_and_one_shard_is_an_error_not_a_hang(tmp_path, workers):
    """streaming accepts a cache_limit above the index's size; a fetch that then needs room and finds nothing
    to evict makes streaming raise while it holds its cache file lock, and every other reader of the cache
    (the other fetch thread, every rank) waited for that lock forever, silently (seen with a bucket
    dataset of tiny shards)."""
    root = write_synthetic_latents(
        str(tmp_path / "tiny"), 24, latent_channels=1, latent_size=2, num_classes=2, shard_size=64
    )  # a record per shard: the index outweighs three shards
    index_bytes = os.path.getsize(os.path.join(root, MDS_INDEX))
    shards = json.load(open(os.path.join(root, MDS_INDEX)))["shards"]
    shard = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in shards)
    limit = max(index_bytes + 1, 4 * shard)  # streaming's two minimums
    assert limit < index_bytes + shard  # no room for the index and one shard
    ds = build_dataset(root, batch_size=4, seed=0, local=str(tmp_path / "cache"), cache_limit=limit)
    with pytest.raises(DataError, match=rf"data.cache_limit={limit}: too small for {root}/slice-.*; raise it"):
        if workers is None:
            list(ds)
        else:
            list(build_dataloader(ds, batch_size=4, num_workers=workers))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_damaged_shard_in_a_loader_worker_is_a_data_error(pristine, tmp_path, fmt):
    root = copy_of(pristine, fmt, tmp_path)
    bad = shard_files(root)[-1]
    truncate(bad)
    with pytest.raises(DataError, match=os.path.basename(bad)):
        read_all(root, str(tmp_path / "cache") if fmt == "mds" else None, workers=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [None, 1])
def test_fetch_threads_that_both_fail_end_the_read_with_their_error(pristine, tmp_path, monkeypatch, workers):
    """streaming waits for its fetch threads to be counted out, and a thread that raises never is: two
    failing at once (both fetching one damaged shard) once hung the reader. The failure must end the read."""
    from streaming import StreamingDataset

    def failing(name):
        def thread(self, it):
            raise DataError(f"{name} thread: shard.00001.mds.zstd cannot be fetched")

        return thread

    monkeypatch.setattr(StreamingDataset, "_prepare_thread", failing("prepare"))
    monkeypatch.setattr(StreamingDataset, "_ready_thread", failing("ready"))
    with pytest.raises(DataError, match="thread: shard.00001.mds.zstd cannot be fetched"):
        read_all(copy_of(pristine, "mds", tmp_path), str(tmp_path / "cache"), workers=workers)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_corrupt_or_missing_index_names_the_dataset_file(pristine, tmp_path, fmt):
    root = copy_of(pristine, fmt, tmp_path)
    index = os.path.join(root, MDS_INDEX if fmt == "mds" else WDS_INDEX)
    with open(index, "w") as f:
        f.write('{"shards": [')
    with pytest.raises(DataError, match=f"{index}: not valid JSON"):
        build_dataset(root, batch_size=4, local=str(tmp_path / "cache"))
    os.remove(index)
    with pytest.raises(DataError, match=f"{index} not found"):
        build_dataset(root, batch_size=4, local=str(tmp_path / "cache"))


# --- the cache is keyed by content ---------------------------------------------------------------------


def test_reencoded_dataset_is_never_served_from_an_old_cache(pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("DITSCALE_DATA_CACHE", str(tmp_path / "default"))
    root = copy_of(pristine, "mds", tmp_path)
    cache = str(tmp_path / "cache")
    old = read_all(root, cache)
    assert [i for i, _ in read_all(root)] == [i for i, _ in old]  # default cache, keyed by content
    first_default = os.listdir(tmp_path / "default")
    shutil.rmtree(root)
    copy_of(pristine, "mds", tmp_path, seed=1)  # re-encoded in place
    new_in_place = read_all(root, root)
    for local in (cache, None):
        new = read_all(root, local)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(new, new_in_place))
        assert not any(torch.equal(a, b) for (_, a), (_, b) in zip(new, old))
    assert set(os.listdir(tmp_path / "default")) - set(first_default)  # another directory for the new index


def test_foreign_cache_is_cleared_and_a_damaged_copy_fetched_again(pristine, tmp_path):
    cache = str(tmp_path / "cache")
    mds = copy_of(pristine, "mds", tmp_path)
    other = write_synthetic_latents(
        str(tmp_path / "other"), 12, latent_channels=1, latent_size=8, num_classes=10, seed=3
    )
    read_all(other, cache)
    index = open(os.path.join(mds, MDS_INDEX), "rb").read()
    assert claim_cache(cache, os.path.abspath(mds), index)  # foreign: cleared
    assert json.load(open(os.path.join(cache, CACHE_MARKER)))["index"] == index_key(index)
    assert not claim_cache(cache, os.path.abspath(mds), index)  # now its own
    expected = read_all(mds, mds)
    read_all(mds, cache)
    decompressed = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f.endswith(".mds")]
    assert decompressed
    for path in decompressed:
        flip_byte(path)
    got = read_all(mds, cache)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected)) and len(got) == N
    assert content_cache_dir("/d", b"a") != content_cache_dir("/d", b"b")


def test_a_cache_another_live_process_reads_is_shared_or_refused_never_cleared(pristine, tmp_path):
    """Two jobs on one node given one data.cache: the same dataset shares it; another dataset would clear
    the live job's shards, so it is refused (DataError naming data.cache) until that job has ended."""
    import subprocess
    import sys

    cache = str(tmp_path / "cache")
    mds = copy_of(pristine, "mds", tmp_path)
    other = write_synthetic_latents(str(tmp_path / "other"), 12, latent_channels=1, latent_size=8, num_classes=10)
    reader = (
        "import sys, time\n"
        "from ditscale.data import build_dataset\n"
        "ds = build_dataset(sys.argv[1], batch_size=4, seed=0, shuffle=False, local=sys.argv[2], hflip=False)\n"
        "print(sum(1 for _ in ds), flush=True)\n"
        "time.sleep(120)\n"
    )
    live = subprocess.Popen(
        [sys.executable, "-c", reader, other, cache],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert live.stdout.readline().strip() == "12"  # the other job has read its dataset through the cache
        kept = sorted(os.listdir(cache))
        index = open(os.path.join(mds, MDS_INDEX), "rb").read()
        with pytest.raises(DataError, match=r"data.cache .*another live process on this node is reading"):
            claim_cache(cache, os.path.abspath(mds), index)
        with pytest.raises(DataError, match="data.cache"):
            read_all(mds, cache)
        assert sorted(os.listdir(cache)) == kept  # nothing removed under the live reader
        assert len(read_all(other, cache)) == 12  # its own dataset: shared
    finally:
        live.kill()
        live.wait()
    assert claim_cache(cache, os.path.abspath(mds), index)  # that job has ended: cleared and taken
    assert len(read_all(mds, cache)) == N


# --- train --check: index and shard list ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_check_dataset_finds_missing_short_and_flipped_shards(pristine, tmp_path, fmt):
    root = copy_of(pristine, fmt, tmp_path)
    meta = json.load(open(os.path.join(root, "dataset.json")))
    assert check_dataset(root, meta).problems == [] and check_dataset(root, meta, deep=True).problems == []
    files = shard_files(root)
    size = os.path.getsize(files[1])
    os.remove(files[0])
    truncate(files[1])
    flip_byte(files[2])
    quick, deep = check_dataset(root, meta), check_dataset(root, meta, deep=True)
    assert quick.problems == [
        f"{files[0]}: missing",
        f"{files[1]}: {os.path.getsize(files[1])} bytes, the index says {size}",
    ]
    assert deep.problems[:2] == quick.problems
    assert {p.split(":")[0] for p in deep.problems[2:]} == {files[2]}
    assert any("sha1" in p for p in deep.problems) and any("xxh64" in p for p in deep.problems)
    assert deep.bytes > 0


@pytest.mark.parametrize(
    "fmt,ranks,micro,workers",
    [("mds", 1, 6, 0), ("wds", 1, 4, 0), ("wds", 1, 6, 2), ("wds", 2, 4, 2), ("wds", 3, 5, 1), ("wds", 1, 16, 2)],
)
def test_batches_per_epoch_is_what_a_rank_gets(pristine, tmp_path, monkeypatch, fmt, ranks, micro, workers):
    root = pristine[fmt]
    predicted = batches_per_epoch(fmt, N, ranks=ranks, micro_batch=micro, workers=workers)
    for name, value in (("WORLD_SIZE", ranks), ("RANK", 0), ("LOCAL_WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(name, str(value))
    ds = build_dataset(root, batch_size=micro, seed=0, local=str(tmp_path / "cache") if fmt == "mds" else None)
    got = sum(1 for _ in build_dataloader(ds, batch_size=micro, num_workers=workers))
    assert got == predicted


def test_dataset_smaller_than_a_global_batch_is_refused_with_the_numbers(pristine):
    meta = {"format": "wds", "num_samples": 20}
    with pytest.raises(
        DataError,
        match=r"20 samples, fewer than one global batch \(train.global_batch=32 = "
        r"2 rank\(s\) x micro-batch 8 x accumulation 2\)",
    ):
        check_fills_batch(meta, global_batch=32, ranks=2, micro_batch=8, workers=2)
    with pytest.raises(DataError, match="give no micro-batch of 16 per rank.*8 samples"):
        check_fills_batch({**meta, "num_samples": 16}, global_batch=16, ranks=1, micro_batch=16, workers=2)
    check_fills_batch({**meta, "format": "mds", "num_samples": 16}, global_batch=16, ranks=1, micro_batch=16, workers=2)


def test_train_refuses_damaged_or_small_data_with_exit_2(pristine, tmp_path, capsys):
    from ditscale.data.prefetch import endless
    from ditscale.train import main

    root = copy_of(pristine, "wds", tmp_path)
    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_test.yaml")
    args = ["--config", tiny, f"data.root={root}", f"run_dir={tmp_path / 'run'}", "data.num_workers=0"]
    flip_byte(shard_files(root)[0])
    assert main(args + ["--check"]) == 0  # sizes agree: only the hashes see it
    assert main(args + ["--check", "--deep"]) == 2
    assert f"{shard_files(root)[0]}: sha1" in capsys.readouterr().err
    assert main(args + ["train.global_batch=48", "--check"]) == 2
    assert "40 samples, fewer than one global batch (train.global_batch=48" in capsys.readouterr().err
    ds = build_dataset(pristine["wds"], batch_size=32, seed=0)
    with pytest.raises(DataError, match="an epoch of 40 samples gave this rank no batch of 32"):
        next(endless(build_dataloader(ds, batch_size=32, num_workers=2)))


# --- a stop signal cuts a data wait short, after its grace period ----------------------------------------


def _timed_wait(stop, seconds: float, signal_first: bool = False) -> tuple[str, float]:
    """A data wait of `seconds` with SIGTERM sent at its start (inside it, or just before): how it ended
    ("batch" or StopWaiting's message) and after how long."""
    start = time.monotonic()
    try:
        if signal_first:
            os.kill(os.getpid(), signal.SIGTERM)
        with stop.waiting():
            if not signal_first:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(seconds)
        return "batch", time.monotonic() - start
    except StopWaiting as e:
        return str(e), time.monotonic() - start


@pytest.mark.parametrize("signal_first", [False, True], ids=["during", "before"])
def test_stop_signal_cuts_a_data_wait_short_after_its_grace_period(signal_first):
    """A batch that comes within train.stop_data_wait_s of the signal is trained on (the stop is then agreed
    at the step boundary, with a checkpoint); a wait still blocked then is cut short with StopWaiting. 0 cuts
    it at once."""
    stop = StopRequest(data_wait_s=1.0)
    try:
        assert _timed_wait(stop, 0.3, signal_first)[0] == "batch"
        assert stop.received == signal.SIGTERM
        how, took = _timed_wait(stop, 30, signal_first)  # a data wait that would never end
        assert how == "SIGTERM" and 0.9 < took < 10, (how, took)
        assert _timed_wait(stop, 0.01)[0] == "batch"  # each wait has its own grace
        stop.data_wait_s = 0.0
        how, took = _timed_wait(stop, 30, signal_first)
        assert how == "SIGTERM" and took < 5, (how, took)
    finally:
        stop.restore()
    time.sleep(1.5)  # no timer of an ended wait fires (the default SIGTERM would end this process)
    assert stop.agreed(1)
