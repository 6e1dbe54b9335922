"""data_prep on real photographs (scikit-image) and a tiny random-weight AutoencoderKL: round trips,
scale-out, crash and rerun, bad inputs, integrity checks. Reference values come from independent code
paths: torchvision's transforms, the diffusers VAE called directly, streaming's and webdataset's own
readers."""

import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_prep import images, make_dataset
from data_prep.__main__ import main as cli
from data_prep.encode import KILL_AFTER_ENV, EncodeConfig, run
from data_prep.errors import DataPrepError, TooManyBadInputs
from data_prep.merge import merge
from data_prep.testing import save_tiny_vae, write_image_folder, write_image_tars
from data_prep.verify import verify

pytestmark = pytest.mark.usefixtures("streaming_shm")

RES = 32


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {
        "images": write_image_folder(str(root / "images"), classes=3, per_class=4),
        "vae": save_tiny_vae(str(root / "vae")),
    }


@pytest.fixture(scope="module")
def vae_mds(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vae_mds") / "ds")
    return make_dataset(src["images"], out, resolution=RES, vae=src["vae"], decode_workers=0, batch_size=5)


def encode(src, out, **kw):
    kw = {
        "resolution": RES,
        "decode_workers": 0,
        "batch_size": 4,
        "progress": False,
        "worker": 0,
        "num_workers": 1,
        **kw,
    }
    return run(EncodeConfig(input=kw.pop("input", src["images"]), out=str(out), **kw))


def read_records(root):
    """{key: (stored array columns, label)} through the libraries' own readers, not ditscale.data."""
    meta = json.load(open(os.path.join(root, "dataset.json")))
    out = {}
    if meta["format"] == "mds":
        from streaming import StreamingDataset

        ds = StreamingDataset(
            remote=root, local=f"{root}.cache-{len(os.listdir(os.path.dirname(root)))}", shuffle=False, batch_size=1
        )
        for r in ds:
            assert r["key"] not in out, f"duplicate {r['key']}"
            out[r["key"]] = ({k: v for k, v in r.items() if isinstance(v, np.ndarray)}, r["label"])
    else:
        import webdataset as wds

        index = json.load(open(os.path.join(root, "wds_index.json")))
        urls = [os.path.join(root, s["basename"]) for s in index["shards"]]
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            key = s["__key__"].replace("%2E", ".").replace("%25", "%")
            assert key not in out, f"duplicate {key}"
            load = lambda b: np.load(__import__("io").BytesIO(b), allow_pickle=False)  # noqa: E731
            arrays = {k.removesuffix(".npy"): load(v) for k, v in s.items() if k.endswith(".npy")}
            out[key] = (arrays, int(s["cls"]))
    return out


# --- center crop -------------------------------------------------------------------------------------


def test_center_crop_matches_adm_steps():
    """600×400 → 32: halve (BOX) to 300×200, 150×100, 75×50 (50 < 64 stops), BICUBIC to 48×32, crop x 8:40."""
    import skimage.data

    img = Image.fromarray(skimage.data.coffee()).resize((600, 400))
    ref = img.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX).resize((75, 50), Image.BOX)
    ref = np.asarray(ref.resize((48, 32), Image.BICUBIC))[:, 8:40]
    np.testing.assert_array_equal(images.center_crop_arr(img, 32), ref)
    tall = img.transpose(Image.Transpose.TRANSPOSE)  # 400×600: crop rows 8:40
    ref = tall.resize((200, 300), Image.BOX).resize((100, 150), Image.BOX).resize((50, 75), Image.BOX)
    np.testing.assert_array_equal(
        images.center_crop_arr(tall, 32), np.asarray(ref.resize((32, 48), Image.BICUBIC))[8:40]
    )
    exact = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3) % 251)
    np.testing.assert_array_equal(
        images.center_crop_arr(exact, 32), np.asarray(exact.resize((32, 32), Image.BOX))
    )  # one halving, no resize


def test_folder_labels_follow_sorted_class_names(tmp_path):
    for cls in ("zebra", "Apple", "mango"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "a.png")
    (tmp_path / ".hidden").mkdir()
    items, classes = images.list_image_folder(str(tmp_path))
    assert classes == ["Apple", "mango", "zebra"]
    assert items == [("Apple/a.png", 0), ("mango/a.png", 1), ("zebra/a.png", 2)]


# --- round trips -------------------------------------------------------------------------------------


def test_vae_round_trip_equals_direct_encoding(src, vae_mds):
    """Stored posteriors equal the VAE applied to DiT's transform of each image and of its mirror."""
    import torchvision.transforms.functional as TF
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src["vae"]).eval()
    records = read_records(vae_mds)
    items, classes = images.list_image_folder(src["images"])
    assert sorted(records) == sorted(rel for rel, _ in items)
    direct = {}
    for rel, label in items:
        with Image.open(os.path.join(src["images"], rel)) as im:
            crop = Image.fromarray(images.center_crop_arr(im.convert("RGB"), RES))
        x = TF.normalize(TF.to_tensor(crop), [0.5] * 3, [0.5] * 3)
        with torch.no_grad():
            dist = vae.encode(torch.stack([x, TF.hflip(x)])).latent_dist  # (2, 4, h, w): image, mirror
        direct[rel] = (dist.mean, dist.logvar, label)
        stored, stored_label = records[rel]
        mean, logvar = stored["mean"], stored["logvar"]
        assert stored_label == label and classes[label] == rel.split("/")[0]
        assert mean.dtype == np.float16 and mean.shape == (2, 4, RES // 2, RES // 2)
        np.testing.assert_allclose(mean.astype(np.float32), dist.mean.numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(logvar.astype(np.float32), dist.logvar.numpy(), atol=2e-3, rtol=2e-3)

    from ditscale.data import build_dataset, flip_of

    ds = build_dataset(vae_mds, batch_size=4, seed=3, local=os.path.join(os.path.dirname(vae_mds), "cache"))
    seen = set()
    for item in ds:  # the trainer's view: one flip per (seed, epoch, index)
        rel = ds.record(item["index"])["key"]
        mean, logvar, label = direct[rel]
        flip = flip_of(3, 0, item["index"])
        torch.testing.assert_close(item["mean"].float(), mean[flip], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(item["logvar"].float(), logvar[flip], atol=2e-3, rtol=2e-3)
        assert item["label"] == label
        seen.add(rel)
    assert seen == set(direct)
    meta = json.load(open(os.path.join(vae_mds, "dataset.json")))
    assert meta["classes"] == ["class_0", "class_1", "class_2"] and meta["num_samples"] == 12
    assert meta["scale_factor"] == pytest.approx(0.18215) and meta["latent_size"] == RES // 2


@pytest.mark.parametrize("fmt,channels", [("wds", 3), ("mds", 1)])
def test_pixel_mode_stores_the_image(src, tmp_path, fmt, channels):
    root = make_dataset(
        src["images"], str(tmp_path / "px"), resolution=RES, format=fmt, image_channels=channels, decode_workers=0
    )
    records = read_records(root)
    crops = {}
    for rel, (arrays, _) in records.items():  # the crop itself, once: (H, W, C) uint8
        with Image.open(os.path.join(src["images"], rel)) as im:
            crops[rel] = images.center_crop_arr(im.convert("RGB" if channels == 3 else "L"), RES)
        assert sorted(arrays) == ["pixels"] and arrays["pixels"].dtype == np.uint8
        np.testing.assert_array_equal(arrays["pixels"], crops[rel].reshape(RES, RES, channels))
    meta = json.load(open(os.path.join(root, "dataset.json")))
    assert meta["vae"] == "none" and meta["record"] == "pixels" and meta["scale_factor"] == 1.0
    assert meta["latent_channels"] == channels
    # the trainer's view: the image in [-1, 1] (ToTensor + Normalize) of the item's flip, std 0
    from ditscale.data import build_dataset, flip_of

    ds = build_dataset(root, batch_size=4, seed=5, local=str(tmp_path / "cache"))
    keys, means = list(records), []  # keys in the order the dataset numbers them
    for item in ds:
        rel = keys[item["index"]]
        x = torch.from_numpy(crops[rel].reshape(RES, RES, channels).copy()).permute(2, 0, 1).float() / 255
        x = ((x - 0.5) / 0.5).half()  # (C, H, W)
        flip = flip_of(5, 0, item["index"])
        assert torch.equal(item["mean"], x.flip(-1) if flip else x), rel
        assert item["mean"].dtype == torch.float16 and torch.isneginf(item["logvar"]).all()
        means += [x, x.flip(-1)]
    assert len(means) == 2 * len(records)
    # the statistics (taken from value counts in the decode workers) are those of the values trained on
    stored = torch.stack(means).double()  # (2N, C, H, W)
    np.testing.assert_allclose(meta["latent_stats"]["mean"], stored.mean((0, 2, 3)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(meta["latent_stats"]["std"], stored.std((0, 2, 3), unbiased=False), rtol=1e-9)


def test_webdataset_image_input(src, tmp_path):
    tars = write_image_tars(src["images"], str(tmp_path / "tars"), per_tar=5)
    assert len(tars) == 3
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    root = make_dataset(
        str(tmp_path / "tars"),
        str(tmp_path / "out"),
        resolution=RES,
        vae=src["vae"],
        classes=str(tmp_path / "names.txt"),
        decode_workers=0,
    )
    from_tars = read_records(root)
    meta = json.load(open(os.path.join(root, "dataset.json")))
    assert meta["classes"] == ["zero", "one", "two"] and meta["num_samples"] == 12
    items, _ = images.list_image_folder(src["images"])
    labels = {os.path.splitext(rel.replace("/", "_"))[0]: label for rel, label in items}
    for key, (_, label) in from_tars.items():
        assert labels[key.split("/", 1)[1]] == label


# --- scale-out, crash and rerun ----------------------------------------------------------------------


def test_two_workers_and_merge_equal_one_worker(src, vae_mds, tmp_path):
    out = tmp_path / "two"
    encode(src, out, vae=src["vae"], worker=1, num_workers=2)
    with pytest.raises(DataPrepError, match="slice-00000-of-00002"):
        merge(str(out))  # worker 0 has not run yet
    encode(src, out, vae=src["vae"], worker=0, num_workers=2)
    merge(str(out))
    two, one = read_records(str(out)), read_records(vae_mds)
    assert sorted(two) == sorted(one)
    for key in one:
        assert sorted(two[key][0]) == ["logvar", "mean"]
        for name in ("mean", "logvar"):
            np.testing.assert_array_equal(two[key][0][name], one[key][0][name])
        assert two[key][1] == one[key][1]
    assert verify(str(out)).ok


def _killed_child(src, out):
    os.environ[KILL_AFTER_ENV] = "5"
    torch.set_num_threads(1)
    encode(src, out, num_slices=3)


def test_killed_worker_rerun_redoes_only_unfinished_slices(src, vae_mds, tmp_path):
    """A real process SIGKILLed inside slice 1 (4 images per slice, killed after 5); the rerun keeps
    slice 0 as it is and writes slices 1 and 2."""
    out = tmp_path / "crash"
    child = multiprocessing.get_context("fork").Process(target=_killed_child, args=(src, str(out)))
    child.start()
    child.join(120)
    assert child.exitcode == -9
    names = sorted(os.listdir(out))
    assert names == ["slice-00000-of-00003", "slice-00001-of-00003.partial"]
    done = out / "slice-00000-of-00003"
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    with pytest.raises(DataPrepError, match="not complete"):
        merge(str(out))

    summaries = encode(src, out, num_slices=3)  # pixel mode here: quick
    assert [s["slice"] for s in summaries] == ["slice-00001-of-00003", "slice-00002-of-00003"]
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before
    assert sorted(os.listdir(out)) == [f"slice-0000{k}-of-00003" for k in range(3)]
    merge(str(out))
    records = read_records(str(out))
    assert sorted(records) == sorted(read_records(vae_mds))
    assert encode(src, out, num_slices=3) == []  # all complete: nothing to do


def test_rerun_with_changed_input_is_refused(src, tmp_path):
    images_dir = tmp_path / "imgs"
    shutil.copytree(src["images"], images_dir)
    encode(src, tmp_path / "out", input=str(images_dir))
    Image.new("RGB", (50, 40)).save(images_dir / "class_1" / "new.png")
    with pytest.raises(DataPrepError, match="other settings"):
        encode(src, tmp_path / "out", input=str(images_dir))
    with pytest.raises(DataPrepError, match="another slicing"):
        encode(src, tmp_path / "out", input=str(images_dir), num_slices=2)


def test_staging_then_upload(src, tmp_path):
    """--staging: shards written locally and copied to --out by streaming's uploader, summary last."""
    out, staging = tmp_path / "shared", tmp_path / "node-local"
    for fmt in ("mds", "wds"):
        encode(src, out / fmt, format=fmt, staging=str(staging), num_slices=2)
        assert not any(staging.iterdir())  # staging emptied after upload
        merge(str(out / fmt))
        assert verify(str(out / fmt)).ok
        assert len(read_records(str(out / fmt))) == 12


# --- bad inputs ----------------------------------------------------------------------------------------


def _bad_folder(src, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(src["images"], root)
    good = sorted((root / "class_0").glob("*.jpg"))[0].read_bytes()
    (root / "class_0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "class_2" / "notes.txt").write_text("not an image")
    (root / "class_2" / "empty.png").write_bytes(b"")
    return root


def test_bad_inputs_are_skipped_and_listed(src, tmp_path):
    root = _bad_folder(src, tmp_path)
    out = tmp_path / "out"
    make_dataset(str(root), str(out), resolution=RES, decode_workers=0, max_bad_fraction=0.5)
    report = json.load(open(out / "report.json"))
    skipped = {e["path"]: e["reason"] for e in report["skipped_inputs"]}
    assert set(skipped) == {"class_0/truncated.jpg", "class_1/random.jpg", "class_2/notes.txt", "class_2/empty.png"}
    assert "truncated" in skipped["class_0/truncated.jpg"]
    assert report["inputs"] == 16 and report["skipped"] == 4
    assert sorted(read_records(str(out))) == sorted(rel for rel, _ in images.list_image_folder(src["images"])[0])


def test_too_many_bad_inputs_fail(src, tmp_path):
    root = _bad_folder(src, tmp_path)
    with pytest.raises(TooManyBadInputs, match="truncated.jpg"):
        encode(src, tmp_path / "out", input=str(root))
    assert not (tmp_path / "out" / "slice-00000-of-00001").exists()  # never published
    listed = json.load(open(tmp_path / "out" / "slice-00000-of-00001.partial" / "report.json"))
    assert listed["skipped"] >= 1
    code = cli(
        [
            "encode",
            "--input",
            str(root),
            "--out",
            str(tmp_path / "cli"),
            "--resolution",
            "32",
            "--decode-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 2


def test_broken_tar_input_is_reported(src, tmp_path):
    tars = write_image_tars(src["images"], str(tmp_path / "tars"), per_tar=6)
    data = open(tars[1], "rb").read()
    open(tars[1], "wb").write(data[: len(data) // 2])  # second tar breaks off mid-way
    out = tmp_path / "out"
    make_dataset(str(tmp_path / "tars"), str(out), resolution=RES, decode_workers=2, max_bad_fraction=0.5)
    report = json.load(open(out / "report.json"))
    assert any(e["path"] == "images-00001.tar" and "tar" in e["reason"] for e in report["skipped_inputs"])
    assert 6 <= json.load(open(out / "dataset.json"))["num_samples"] < 12


# --- the VAE argument --------------------------------------------------------------------------------


def test_vae_path_errors_come_before_any_work(src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match="--vae .*not a directory"):
        encode(src, out, vae=str(tmp_path / "nope"), input=str(tmp_path / "no-input"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(src["vae"], "config.json"), pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DataPrepError, match="safetensors"):
        encode(src, out, vae=str(pickled))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DataPrepError, match="not an AutoencoderKL"):
        encode(src, out, vae=str(unet))
    assert not out.exists()


def test_measured_scale_factor_whitens_sampled_latents(src, tmp_path):
    from ditscale.data.posterior import sample_latents

    root = make_dataset(
        src["images"], str(tmp_path / "m"), resolution=RES, vae=src["vae"], scale_factor="measure", decode_workers=0
    )
    scale = json.load(open(os.path.join(root, "dataset.json")))["scale_factor"]
    assert isinstance(scale, list) and len(scale) == 4
    recs = read_records(root).values()
    mean = torch.from_numpy(np.concatenate([r[0]["mean"] for r in recs]))  # (2N, 4, h, w)
    logvar = torch.from_numpy(np.concatenate([r[0]["logvar"] for r in recs]))
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([sample_latents(mean, logvar, scale, gen) for _ in range(20)])
    np.testing.assert_allclose(z.std(dim=(0, 2, 3)).numpy(), 1.0, atol=0.03)


# --- verify ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_verify_names_the_shard_with_a_flipped_byte(src, tmp_path, fmt):
    root = tmp_path / fmt
    encode(src, root, format=fmt, num_slices=2, shard_size=2_500)  # pixel records: 3 * RES**2 bytes
    merge(str(root))
    assert verify(str(root)).ok
    shard_files = sorted(p for p in root.glob("slice-*/shard*") if not p.name.endswith(".json"))
    assert len(shard_files) >= 4
    victim = shard_files[len(shard_files) // 2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    result = verify(str(root))
    name = f"{victim.parent.name}/{victim.name}"
    assert not result.ok and all(name in p for p in result.problems), result.problems
    assert cli(["verify", str(root)]) == 1


# --- slicing -------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(total=st.integers(0, 500), num_slices=st.integers(1, 40), num_workers=st.integers(1, 12))
def test_slices_are_disjoint_balanced_and_cover_everything(total, num_slices, num_workers):
    from data_prep.slices import slice_bounds, slices_of_worker

    bounds = [slice_bounds(total, num_slices, k) for k in range(num_slices)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    owned = sorted(k for w in range(num_workers) for k in slices_of_worker(w, num_workers, num_slices))
    assert owned == list(range(num_slices))


def test_worker_place_from_flags_torchrun_and_slurm():
    from data_prep.slices import resolve_worker

    assert resolve_worker(2, 4, {"RANK": "1", "WORLD_SIZE": "8"})[:2] == (2, 4)
    assert resolve_worker(env={"RANK": "3", "WORLD_SIZE": "8", "SLURM_ARRAY_TASK_ID": "1"})[:2] == (3, 8)
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_worker(env=array)[:2] == (2, 4)
    stepped = {
        "SLURM_ARRAY_TASK_ID": "4",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "2",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    assert resolve_worker(env=stepped)[:2] == (2, 3)
    assert resolve_worker(env={"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_STEP_ID": "0"})[:2] == (5, 6)
    assert resolve_worker(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_JOB_ID": "1"})[:2] == (0, 1)
    assert resolve_worker(env={})[:2] == (0, 1)
    with pytest.raises(ValueError, match="go together"):
        resolve_worker(1, None, {})
    with pytest.raises(ValueError, match="outside"):
        resolve_worker(4, 4, {})


@pytest.mark.slow
def test_command_line_worker_of_a_slurm_array(src, tmp_path):
    """`python -m data_prep encode` as array task 1 of 2 writes slice 1 only; task 0 and merge finish."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "PYTHONPATH": os.getcwd(),
    }
    for name in ("RANK", "WORLD_SIZE"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "encode",
        "--input",
        src["images"],
        "--out",
        str(tmp_path),
        "--resolution",
        "16",
        "--decode-workers",
        "0",
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "SLURM array" in done.stderr and "slice-00001-of-00002: 6 images" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["slice-00001-of-00002"]
    assert (
        cli(
            [
                "encode",
                "--input",
                src["images"],
                "--out",
                str(tmp_path),
                "--resolution",
                "16",
                "--decode-workers",
                "0",
                "--no-progress",
                "--worker",
                "0",
                "--num-workers",
                "2",
            ]
        )
        == 0
    )
    assert cli(["merge", str(tmp_path)]) == 0 and cli(["verify", str(tmp_path)]) == 0
