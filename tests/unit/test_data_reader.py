"""ditscale.data: items equal the stored records with the flip the contract names, both formats agree,
resume is exact, posterior sampling is right, and the epoch plans of the webdataset reader hold."""

import itertools
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep import make_dataset
from data_prep.testing import write_image_folder
from ditscale.data import build_dataloader, build_dataset, flip_of, read_metadata, sample_latents
from ditscale.data.wds import consumed_per_worker, plan_epoch

pytestmark = pytest.mark.usefixtures("streaming_shm")

BATCH = 4


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The same 30 images in both formats, in small shards (several per slice) over 2 slices."""
    base = tmp_path_factory.mktemp("reader")
    images = write_image_folder(str(base / "images"), classes=3, per_class=10, min_side=16, max_side=24)
    opts = {"resolution": 8, "num_slices": 2, "shard_size": 4000, "decode_workers": 0}
    return {fmt: make_dataset(images, str(base / fmt), format=fmt, **opts) for fmt in ("mds", "wds")}


_caches = itertools.count()


def dataset(root, tmp_path, **kw):
    kw.setdefault("batch_size", BATCH)
    return (
        build_dataset(root, local=str(tmp_path / f"cache{next(_caches)}"), **kw)
        if read_metadata(root)["format"] == "mds"
        else build_dataset(root, **kw)
    )


def batches(loader, limit=None):
    out = []
    for b in loader:
        out.append({k: v.clone() for k, v in b.items()})
        if limit and len(out) == limit:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


# --- flips and posterior sampling -----------------------------------------------------------------


def test_flip_is_a_balanced_pure_function():
    flips = np.array([flip_of(3, 0, i) for i in range(4000)])
    assert 0.45 < flips.mean() < 0.55
    assert flips.tolist() == [flip_of(3, 0, i) for i in range(4000)]
    other_epoch = np.array([flip_of(3, 1, i) for i in range(4000)])
    other_seed = np.array([flip_of(4, 0, i) for i in range(4000)])
    assert 0.4 < (flips != other_epoch).mean() < 0.6 and 0.4 < (flips != other_seed).mean() < 0.6


def test_sample_latents_formula_and_statistics():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(64, 4, 8, 8).half()
    logvar = (torch.rand(64, 4, 8, 8) * 2 - 3).half()
    scale = [0.5, 1.0, 2.0, 0.18215]
    z = sample_latents(mean, logvar, scale, torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    s = torch.tensor(scale).view(1, 4, 1, 1)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, s * (mean.float() + torch.exp(logvar.float() / 2) * eps))
    draws = torch.stack([sample_latents(mean, logvar, 1.0, gen) for _ in range(400)])
    torch.testing.assert_close(draws.mean(0), mean.float(), atol=0.25, rtol=0)
    torch.testing.assert_close(draws.std(0).mean(), torch.exp(logvar.float() / 2).mean(), atol=0.01, rtol=0)
    pixel = sample_latents(mean, torch.full_like(mean, float("-inf")), 2.0, gen)
    assert torch.equal(pixel, 2.0 * mean.float())
    with pytest.raises(ValueError, match="3 entries for 4 channels"):
        sample_latents(mean, logvar, [1.0, 1.0, 1.0])


# --- reading -----------------------------------------------------------------------------------------


def test_mds_items_are_the_stored_records_with_the_contract_flip(roots, tmp_path):
    ds = dataset(roots["mds"], tmp_path, shuffle=False, seed=5)
    items = list(ds)
    meta = ds.metadata
    assert sorted(it["index"] for it in items) == list(range(meta["num_samples"])) == list(range(30))
    flips = set()
    for it in items:
        rec = ds.record(it["index"])
        flip = flip_of(5, 0, it["index"])
        flips.add(flip)
        assert it["mean"].dtype == torch.float16 and it["mean"].shape == (3, 8, 8)
        assert torch.equal(it["mean"], torch.from_numpy(np.array(rec["mean"][flip])))
        assert torch.equal(it["logvar"], torch.from_numpy(np.array(rec["logvar"][flip])))
        assert it["label"] == rec["label"] == meta["classes"].index(rec["key"].split("/")[0])
    assert flips == {0, 1}
    guarded = dataset(roots["mds"], tmp_path, shuffle=False, seed=5, cache_limit="10mb")
    for a, b in zip(items, guarded):  # streaming's evicting path gives the same items
        assert torch.equal(a["mean"], b["mean"]) and a["index"] == b["index"]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_hflip_off_always_gives_the_stored_image(roots, tmp_path, fmt):
    """data.hflip=false: never the mirror, in any epoch, for both readers (digits, text)."""
    stored = dataset(roots["mds"], tmp_path, shuffle=False)
    for epoch in itertools.islice(_epochs(dataset(roots[fmt], tmp_path, seed=5, hflip=False)), 2):
        assert sorted(it["index"] for it in epoch) == list(range(30))
        for it in epoch:
            rec = stored.record(it["index"])
            assert torch.equal(it["mean"], torch.from_numpy(np.array(rec["mean"][0]))), it["index"]
            assert torch.equal(it["logvar"], torch.from_numpy(np.array(rec["logvar"][0]))), it["index"]


def test_both_formats_give_the_same_items(roots, tmp_path):
    for epoch_items in zip(
        *(itertools.islice(_epochs(dataset(roots[f], tmp_path, seed=2)), 2) for f in ("mds", "wds"))
    ):
        mds, wds = ({it["index"]: it for it in items} for items in epoch_items)
        assert sorted(mds) == sorted(wds) == list(range(30))
        for i in mds:
            assert torch.equal(mds[i]["mean"], wds[i]["mean"]) and mds[i]["label"] == wds[i]["label"]


def _epochs(ds):
    while True:
        yield list(ds)


def test_shuffle_changes_order_and_flips_between_epochs(roots, tmp_path):
    for fmt in ("mds", "wds"):
        e0, e1 = itertools.islice(_epochs(dataset(roots[fmt], tmp_path, seed=0)), 2)
        assert [i["index"] for i in e0] != [i["index"] for i in e1]
        m0 = {i["index"]: i["mean"] for i in e0}
        assert any(not torch.equal(m0[i["index"]], i["mean"]) for i in e1)  # other flips


@pytest.mark.parametrize(
    "fmt,workers,head", [("mds", 0, 3), ("mds", 2, 3), ("wds", 0, 3), ("wds", 2, 3), ("wds", 2, 7)]
)
def test_resume_mid_epoch_continues_exactly(roots, tmp_path, fmt, workers, head):
    """Save the loader state after `head` batches of epoch 1, resume in a fresh dataset and loader:
    the batches that follow equal the uninterrupted run's (7: one worker's batches are used up)."""

    def loader():
        return build_dataloader(
            dataset(roots[fmt], tmp_path, seed=1), batch_size=BATCH, num_workers=workers, drop_last=False
        )

    full = loader()
    batches(full)
    reference = batches(full)  # epoch 1
    first = loader()
    batches(first)
    done = batches(first, limit=head)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["sample_in_epoch"] == sum(len(b["index"]) for b in done)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert_same_batches(done + batches(resumed), reference)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_resume_after_the_last_full_batch_of_an_epoch_goes_on_with_the_next(roots, tmp_path, fmt):
    """A checkpoint at an epoch's last full batch (drop_last, as the trainer): the rest of that epoch
    gives no batch, and the trainer's endless batches go on with the next epoch as if uninterrupted."""
    from ditscale.data.prefetch import endless

    def loader():
        return build_dataloader(dataset(roots[fmt], tmp_path, seed=1), batch_size=BATCH, num_workers=0)

    per_epoch = 30 // BATCH  # 2 samples left over
    reference = list(itertools.islice(endless(loader()), per_epoch + 2))
    first = loader()
    head = list(itertools.islice(endless(first), per_epoch))
    state = first.state_dict()
    assert state["sample_in_epoch"] == per_epoch * BATCH
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert_same_batches(head + list(itertools.islice(endless(resumed), 2)), reference)


def test_loader_workers_forked_after_parent_iterated(roots, tmp_path):
    ds = dataset(roots["mds"], tmp_path, shuffle=False)
    direct = list(ds)
    got = [b for b in DataLoader(ds, batch_size=None, num_workers=1)]
    assert sorted(b["index"] for b in got) == sorted(i["index"] for i in direct)


def test_metadata_errors_are_clear(roots, tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep merge"):
        read_metadata(str(tmp_path))
    meta = json.load(open(os.path.join(roots["mds"], "dataset.json")))
    del meta["latent_size"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="latent_size"):
        read_metadata(str(tmp_path))
    with pytest.raises(ValueError, match="format 'mds'"):
        build_dataset(roots["mds"], batch_size=BATCH, format="wds")


# --- the webdataset reader's epoch plan --------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    ranks=st.integers(1, 5),
    workers=st.integers(1, 4),
    seed=st.integers(0, 99),
    epoch=st.integers(0, 5),
    shuffle=st.booleans(),
)
def test_plan_epoch_splits_ranks_equally_and_disjointly(counts, ranks, workers, seed, epoch, shuffle):
    seen, per_rank = [], []
    for rank in range(ranks):
        n = 0
        for w in range(workers):
            for shard, start, stop in plan_epoch(
                counts,
                seed=seed,
                epoch=epoch,
                shuffle=shuffle,
                num_ranks=ranks,
                rank=rank,
                num_workers=workers,
                worker=w,
            ):
                assert 0 <= start < stop <= counts[shard]
                seen += [(shard, p) for p in range(start, stop)]
                n += stop - start
        per_rank.append(n)
    assert per_rank == [sum(counts) // ranks] * ranks
    assert len(seen) == len(set(seen)) == sum(counts) // ranks * ranks


class _Tagged(IterableDataset):
    def __init__(self, counts):
        self.counts = counts

    def __iter__(self):
        w = get_worker_info().id
        return iter([w] * self.counts[w])


@pytest.mark.parametrize("counts,batch,drop_last", [([7, 9], 4, False), ([8, 3], 2, True), ([5, 5], 3, False)])
def test_consumed_per_worker_matches_torch_dataloader(counts, batch, drop_last):
    loader = DataLoader(_Tagged(counts), batch_size=batch, num_workers=len(counts), drop_last=drop_last)
    taken, consumed, order = [0] * len(counts), 0, [b.tolist() for b in loader]
    for i, b in enumerate(order):
        assert consumed_per_worker(counts, batch, drop_last, consumed) == (taken, b[0])
        for w in b:
            taken[w] += 1
        consumed += len(b)
    assert consumed_per_worker(counts, batch, drop_last, consumed)[0] == taken


# --- the tar reader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PAX_FORMAT", "GNU_FORMAT", "USTAR_FORMAT"])
def test_tar_members_agree_with_tarfile(tmp_path, fmt):
    import io
    import tarfile

    from ditscale.data.tario import tar_members, tar_samples

    long_dir = "d" * 120 if fmt != "USTAR_FORMAT" else "d" * 60
    files = [
        (f"{long_dir}/k{i}%2Ejpg.{ext}", os.urandom(int(n)))
        for i, n in enumerate([0, 1, 511, 512, 513, 5000])
        for ext in ("mean.npy", "cls")
    ]
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tar:
        tar.addfile(tarfile.TarInfo("adir"))  # not a file: skipped
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert [(n, d) for n, d in tar_members(f) if n != "adir"] == files
    with open(path, "rb") as f:
        samples = list(tar_samples(f))
    assert [k for k, _ in samples] == [f"{long_dir}/k{i}%2Ejpg" for i in range(6)]
    data = path.read_bytes()
    with pytest.raises(EOFError, match="truncated"):
        list(tar_members(io.BytesIO(data[: 2048 + 300])))
    corrupt = bytearray(data)
    corrupt[10] ^= 0xFF  # the name field of the first header
    with pytest.raises(ValueError, match="checksum mismatch at byte 0"):
        list(tar_members(io.BytesIO(bytes(corrupt))))
