"""data_prep on what real image sets contain: EXIF orientation, 16-bit and float modes, tiny and extreme-aspect
images (counted and listed in report.json, skipped past --min-side / --max-aspect)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_prep import make_dataset
from data_prep.errors import DataPrepError
from data_prep.images import ImageChecks, decode_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2], arr[:, width // 2 :] = RED, BLUE
    return Image.fromarray(arr)


def with_orientation(image: Image.Image, orientation: int) -> io.BytesIO:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    buf.seek(0)
    return buf


def test_exif_orientation_is_applied_unless_ignored():
    source = with_orientation(halves(40, 20), 6)  # stored landscape, shown rotated 90° clockwise
    upright, _ = decode_image(source, 16, 3)
    assert (upright[:4] == RED).all() and (upright[-4:] == BLUE).all()
    source.seek(0)
    as_stored, _ = decode_image(source, 16, 3, ImageChecks(16, exif_orientation=False))
    assert (as_stored[:, :4] == RED).all() and (as_stored[:, -4:] == BLUE).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil_exif_transpose(orientation):
    from PIL import ImageOps

    from ditscale.data.crop import center_crop_arr

    rng = np.random.default_rng(orientation)
    source = with_orientation(Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)), orientation)
    with Image.open(source) as image:
        expected = center_crop_arr(ImageOps.exif_transpose(image).convert("RGB"), 12)
    source.seek(0)
    np.testing.assert_array_equal(decode_image(source, 12, 3)[0], expected)


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("I;16", 32896, 128),
        ("I;16", 65535, 255),
        ("I", 1028, 4),
        ("F", 0.5, 128),
        ("1", 1, 255),
        ("P", 7, 7),
        ("CMYK", 0, 255),
    ],
)
def test_high_bit_depth_and_other_modes_convert_to_the_right_values(mode, value, expected):
    if mode == "P":
        image = Image.new("P", (12, 12), value)
        image.putpalette([c for i in range(256) for c in (i, i, i)])
    elif mode in ("I;16", "I", "F"):
        image = Image.fromarray(np.full((12, 12), value, {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        assert image.mode == mode
    else:
        image = Image.new(mode, (12, 12), value)
    buf = io.BytesIO()
    image.save(buf, "TIFF")
    buf.seek(0)
    for channels in (1, 3):
        buf.seek(0)
        arr, _ = decode_image(buf, 8, channels)
        assert arr.shape == (8, 8, channels) and np.abs(arr.astype(int) - expected).max() <= 1, (mode, channels)


def test_small_and_extreme_aspect_images_are_noted_or_skipped():
    checks = ImageChecks(32)
    assert checks.notes(64, 48) == []
    assert checks.notes(1, 1) == ["upscaled: 1x1, short side < resolution 32"]
    assert checks.notes(2000, 3) == ["upscaled: 2000x3, short side < resolution 32", "extreme aspect: 666.7 (2000x3)"]
    with pytest.raises(ValueError, match="too small: 1x1, short side < --min-side 8"):
        ImageChecks(32, min_side=8).notes(1, 1)
    with pytest.raises(ValueError, match=r"extreme aspect ratio 666.7 \(2000x3\) > --max-aspect 4"):
        ImageChecks(32, max_aspect=4).notes(2000, 3)
    with pytest.raises(ValueError, match="--max-aspect 0.5"):
        ImageChecks(32, max_aspect=0.5)


def test_report_lists_and_summary_counts_them(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(folder / f"ok{i}.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "dot.png")
    Image.new("RGB", (400, 12), (9, 9, 9)).save(folder / "strip.png")
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(folder / "deep.png")
    root = make_dataset(str(tmp_path / "images"), str(tmp_path / "ds"), resolution=16, decode_workers=0)
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert {(r["path"], r["note"].split(":")[0]) for r in report["noted_inputs"]} == {
        ("a/dot.png", "upscaled"),
        ("a/strip.png", "upscaled"),
        ("a/strip.png", "extreme aspect"),
    }
    assert report["noted"] == {"upscaled": 2, "extreme_aspect": 1} and report["skipped"] == 0
    assert (meta["upscaled"], meta["extreme_aspect"], meta["num_samples"]) == (2, 1, 7)
    from ditscale.data import build_dataset

    records = build_dataset(root, batch_size=1, local=root)
    deep = next(records.record(i) for i in range(7) if records.record(i)["key"] == "a/deep.png")
    assert np.allclose(deep["mean"][0].astype(np.float32), 128 / 255 * 2 - 1, atol=1e-2)  # not white
    with pytest.raises(DataPrepError, match="2 of 7 inputs could not be used"):
        make_dataset(
            str(tmp_path / "images"), str(tmp_path / "ds2"), resolution=16, decode_workers=0, min_side=4, max_aspect=10
        )
    report = json.loads(next((tmp_path / "ds2").glob("*/report.json")).read_text())
    assert {r["path"] for r in report["skipped_inputs"]} == {"a/dot.png", "a/strip.png"}
