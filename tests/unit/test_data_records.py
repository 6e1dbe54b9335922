"""Record kinds (ditscale/data/records.py): pixel records give the trainer the same bits as posteriors did."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ditscale.data.records import PIXEL_VALUES, as_posterior, columns, pixel_posterior, record_kind
from ditscale.data.schema import mds_columns


def test_pixel_values_are_the_bits_of_totensor_and_normalize():
    import torchvision.transforms.functional as TF

    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)  # (C, H, W) uint8 image
    ref = TF.normalize(TF.convert_image_dtype(every, torch.float32), [0.5], [0.5]).half().flatten()
    assert np.array_equal(PIXEL_VALUES.view(np.uint16), ref.numpy().view(np.uint16))
    assert PIXEL_VALUES[0] == -1 and PIXEL_VALUES[255] == 1 and np.all(np.diff(PIXEL_VALUES.astype(np.float32)) > 0)


@st.composite
def square_images(draw):
    size, channels = draw(st.integers(1, 9)), draw(st.sampled_from([1, 3]))
    return draw(arrays(np.uint8, (size, size, channels)))


@settings(max_examples=50, deadline=None)
@given(square_images(), st.integers(0, 1))
def test_pixel_posterior_is_the_image_or_its_mirror_with_zero_std(px, flip):
    mean, logvar = pixel_posterior(px, flip)
    chw = torch.from_numpy(px.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5).half()  # (C, H, W)
    assert mean.dtype == np.float16 and mean.shape == chw.shape and mean.flags.c_contiguous
    assert torch.equal(torch.from_numpy(mean), chw.flip(-1) if flip else chw)
    assert logvar.shape == mean.shape and np.isneginf(logvar).all()
    both = as_posterior({"pixels": px, "key": "k"}, "pixels", px.shape[2], px.shape[0])  # what record() gives
    assert both["mean"].shape == (2, *mean.shape) and np.array_equal(both["mean"][flip], mean)
    assert np.isneginf(both["logvar"]).all() and both["pixels"] is px


def test_columns_and_kinds():
    assert columns("pixels", 3, 4) == {"pixels": (np.dtype(np.uint8), (4, 4, 3))}
    assert mds_columns(3, 4, record="pixels") == {"pixels": "ndarray:uint8:4,4,3", "label": "int", "key": "str"}
    assert mds_columns(4, 2)["mean"] == "ndarray:float16:2,4,2,2"  # posterior: the columns of every older dataset
    assert record_kind({}) == "posterior" and record_kind({"record": "pixels"}) == "pixels"
    with pytest.raises(ValueError, match=r"x/dataset.json: 'record' is 'jpeg'"):
        record_kind({"record": "jpeg"}, "x/dataset.json")
    with pytest.raises(ValueError, match=r"pixels is uint8\(4, 4, 1\), expected uint8\(4, 4, 3\)"):
        as_posterior({"pixels": np.zeros((4, 4, 1), np.uint8)}, "pixels", 3, 4)


def _images(root, n=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("compression,suffix", [("none", ".mds"), ("zstd:1", ".mds.zstd")])
def test_pixel_mds_shards_compressed_or_not_read_the_same(tmp_path, compression, suffix):
    from data_prep import make_dataset
    from data_prep.verify import verify
    from ditscale.data import build_dataset

    src = _images(tmp_path / "img")
    ref = make_dataset(src, str(tmp_path / "ref"), resolution=8, decode_workers=0)  # auto: uncompressed
    other = make_dataset(src, str(tmp_path / "other"), resolution=8, decode_workers=0, compression=compression)
    index = json.load(open(os.path.join(other, "index.json")))
    assert all((s["zip_data"] or s["raw_data"])["basename"].endswith(suffix) for s in index["shards"])
    assert verify(other).ok
    items = [
        list(build_dataset(r, batch_size=2, seed=1, local=str(tmp_path / f"cache-{i}")))
        for i, r in enumerate((ref, other))
    ]
    assert len(items[0]) == 6 and all(
        torch.equal(a["mean"], b["mean"]) and torch.equal(a["logvar"], b["logvar"]) and a["index"] == b["index"]
        for a, b in zip(*items)
    )


def test_compression_flag_is_checked_before_any_work(tmp_path):
    from data_prep.encode import EncodeConfig
    from data_prep.errors import DataPrepError

    with pytest.raises(DataPrepError, match=r"--compression 'lz4'"):
        EncodeConfig(input="x", out="y", compression="lz4")
    with pytest.raises(DataPrepError, match=r"--compression zstd: only MDS shards are compressed \(--format wds\)"):
        EncodeConfig(input="x", out="y", format="wds", compression="zstd")


def test_verify_names_a_pixels_column_of_the_wrong_shape(tmp_path):
    from data_prep import make_dataset
    from data_prep.verify import verify
    from data_prep.writers import file_info

    root = make_dataset(_images(tmp_path / "img"), str(tmp_path / "w"), resolution=8, format="wds", decode_workers=0)
    index = json.load(open(os.path.join(root, "wds_index.json")))
    shard = os.path.join(root, index["shards"][0]["basename"])
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            if m.name.endswith(".pixels.npy"):
                buf = io.BytesIO()
                np.save(buf, np.zeros((8, 8, 1), np.uint8))
                data = buf.getvalue()
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    open(shard, "wb").write(out.getvalue())
    entry = index["shards"][0]  # the index agrees with the shard: only the record is wrong
    index["shards"][0] = file_info(shard, entry["basename"], entry["samples"])
    json.dump(index, open(os.path.join(root, "wds_index.json"), "w"))
    problems = verify(root).problems
    assert any("pixels is uint8(8, 8, 1), expected uint8(8, 8, 3)" in p for p in problems), problems
