"""data_prep --keep-image: the ADM crop stored beside the posterior (PNG pixel-exact, JPEG close), in MDS
and webdataset; merge, verify and the summary know it; the readers return it, mirrored with the
posterior's flip, only when asked. References: data_prep.images' crop of the source files and the
libraries' own readers (streaming, webdataset)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import images, make_dataset
from data_prep.encode import EncodeConfig
from data_prep.errors import DataPrepError
from data_prep.testing import write_image_folder
from data_prep.verify import verify
from ditscale.data import build_dataset, flip_of
from ditscale.data.image_column import ImageColumn

pytestmark = pytest.mark.usefixtures("streaming_shm")

RES = 16


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """12 images: PNG in MDS over 2 slices, JPEG in webdataset; the expected crops by source path."""
    base = tmp_path_factory.mktemp("kept")
    src = write_image_folder(str(base / "images"), classes=3, per_class=4, min_side=20, max_side=40)
    opts = {"resolution": RES, "decode_workers": 0, "num_slices": 2, "shard_size": 3000}
    crops = {}
    for rel, _ in images.list_image_folder(src)[0]:
        crops[rel] = images.decode_image(os.path.join(src, rel), RES, 3)[0]  # (H, W, 3) uint8
    return {
        "crops": crops,
        "base": base,
        "png": make_dataset(src, str(base / "png"), format="mds", keep_image="png", **opts),
        "jpeg": make_dataset(src, str(base / "jpeg"), format="wds", keep_image="jpeg", image_quality=90, **opts),
    }


def test_png_column_round_trips_pixel_exact_through_streaming(made):
    from streaming import StreamingDataset

    meta = json.load(open(os.path.join(made["png"], "dataset.json")))
    assert meta["image"] == {"codec": "png", "size": RES, "channels": 3, "quality": None}
    column = ImageColumn.from_json(meta["image"])
    ds = StreamingDataset(remote=made["png"], local=str(made["base"] / "png-cache"), shuffle=False, batch_size=1)
    seen = set()
    for rec in ds:
        stored = column.decode(rec["image"])  # (3, H, W)
        np.testing.assert_array_equal(stored.transpose(1, 2, 0), made["crops"][rec["key"]])
        seen.add(rec["key"])
    assert seen == set(made["crops"])
    assert verify(made["png"]).ok


def test_jpeg_column_in_webdataset_is_close_and_verified(made):
    import webdataset as wds

    index = json.load(open(os.path.join(made["jpeg"], "wds_index.json")))
    urls = [os.path.join(made["jpeg"], s["basename"]) for s in index["shards"]]
    errors = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = s["__key__"].replace("%2E", ".").replace("%25", "%")
        with Image.open(__import__("io").BytesIO(s["image.jpg"])) as im:
            assert im.format == "JPEG" and im.size == (RES, RES)
            errors.append(np.abs(np.asarray(im, np.float32) - made["crops"][key]).mean())
    assert len(errors) == 12 and 0 < np.mean(errors) < 6  # lossy, but quality 90 4:4:4 stays close
    assert verify(made["jpeg"]).ok
    meta = json.load(open(os.path.join(made["jpeg"], "dataset.json")))
    assert meta["image"]["codec"] == "jpeg" and meta["image"]["quality"] == 90


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_reader_returns_the_image_of_the_items_flip(made, tmp_path, fmt):
    """Pixel mode: the item's mean is the image in [-1, 1], so the returned image must be that flip."""
    ds = build_dataset(
        made[fmt], batch_size=4, seed=5, with_image=True, **({"local": str(tmp_path / "c")} if fmt == "png" else {})
    )
    flips = set()
    for item in ds:
        image = item["image"]
        assert image.dtype == torch.uint8 and image.shape == (3, RES, RES)
        as_mean = image.float() / 127.5 - 1
        tol = 2e-3 if fmt == "png" else 0.25
        assert (as_mean - item["mean"].float()).abs().mean() < tol
        flips.add(flip_of(5, 0, item["index"]))
    assert flips == {0, 1}


def test_reader_leaves_images_out_unless_asked_and_names_the_missing_column(made, tmp_path):
    item = next(iter(build_dataset(made["png"], batch_size=4, local=str(tmp_path / "c"))))
    assert "image" not in item
    plain = tmp_path / "plain"
    shutil.copytree(made["png"], plain)
    meta = json.loads((plain / "dataset.json").read_text())
    (plain / "dataset.json").write_text(json.dumps({**meta, "image": None}))
    with pytest.raises(ValueError, match=f"{plain}.*holds no images.*--keep-image"):
        build_dataset(str(plain), batch_size=4, local=str(tmp_path / "d"), with_image=True)


def test_summary_reports_bytes_per_image(made, capsys, tmp_path):
    from data_prep.report import summary_line

    summary = json.load(open(os.path.join(made["png"], "slice-00000-of-00002", "summary.json")))
    assert summary["image_bytes"] > 0
    line = summary_line(summary)
    assert "per image" in line and "images kept" in line


def test_bad_keep_image_flags():
    with pytest.raises(DataPrepError, match="--keep-image"):
        EncodeConfig(input="x", out="y", keep_image="gif")
    with pytest.raises(DataPrepError, match="--image-quality"):
        EncodeConfig(input="x", out="y", keep_image="jpeg", image_quality=0)


def test_rerun_with_other_image_settings_is_refused(made, tmp_path):
    from data_prep.encode import run

    src = str(made["base"] / "images")
    with pytest.raises(DataPrepError, match="keep_image"):
        run(
            EncodeConfig(
                input=src,
                out=made["png"],
                resolution=RES,
                decode_workers=0,
                num_slices=2,
                worker=0,
                num_workers=1,
                progress=False,
                shard_size=3000,
            )
        )
