"""The whole evaluation: ADM .npz / image folder → feature network → statistics → metrics → JSON, with a
tiny random feature network standing in for the Inception."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ditscale.evaluate import __main__ as cli
from ditscale.evaluate.features import extract_features, iter_npz_batches, npz_features
from ditscale.evaluate.fid import fid_from_features, frechet_distance
from ditscale.evaluate.metrics import precision_recall
from ditscale.evaluate.reference import load_reference
from ditscale.evaluate.tiny import TinyFeatureNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """Real digits as 32×32 RGB uint8 images (N, 32, 32, 3), each tinted a little differently."""
    data = load_digits()
    gray = np.kron(data.images / 16.0, np.ones((4, 4)))  # (N, 32, 32) in [0, 1]
    tint = np.random.default_rng(0).uniform(0.6, 1.0, (len(gray), 1, 1, 3))
    return (gray[..., None] * tint * 255).round().astype(np.uint8), data.target


@pytest.fixture(scope="module")
def net():
    return TinyFeatureNet(seed=0).eval()


def write_npz(path, images, labels=None, compressed=False):
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def run_cli(tmp_path, net, *args):
    out = tmp_path / "metrics.json"
    assert cli.main([*map(str, args), "--out", str(out), "--no-progress", "--workers", "0"], net=net) == 0
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_in_batches(tmp_path, digits, compressed):
    images = digits[0][:103]
    path = write_npz(tmp_path / "s.npz", images, digits[1][:103], compressed)
    batches = list(iter_npz_batches(path, batch_size=25))
    assert [len(b) for b in batches] == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_bad_sample_files_are_named(tmp_path, net):
    bad = write_npz(tmp_path / "float.npz", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"float.npz: arr_0: expected images \(N, H, W, 3\) uint8"):
        npz_features(net, bad)
    np.savez(tmp_path / "nokey.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no array 'arr_0' \(arrays: \['images'\]\)"):
        npz_features(net, tmp_path / "nokey.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="text.npz: not an .npz"):
        npz_features(net, tmp_path / "text.npz")


def test_features_of_tensors_and_arrays_agree(net, digits):
    images = digits[0][:40]
    a = extract_features(net, [images[:15], images[15:]], progress=False)
    b = extract_features(net, [torch.from_numpy(images)], progress=False)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(net, [images.astype(np.float32)], progress=False)


# --------------------------------------------------------------------------- end to end


def test_end_to_end_same_set(tmp_path, net, digits, capsys):
    images, labels = digits[0][:300], digits[1][:300]
    samples = write_npz(tmp_path / "samples.npz", images, labels)
    ref = write_npz(tmp_path / "ref.npz", images, compressed=True)
    result = run_cli(tmp_path, net, "--samples", samples, "--ref", ref)
    assert json.loads(capsys.readouterr().out) == result
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert 1.0 < result["inception_score"] < 10.0
    assert result["num_samples"] == result["num_reference"] == 300 and "skipped" not in result


def test_end_to_end_matches_direct_computation(tmp_path, net, digits):
    """CLI numbers == metrics computed by hand from the network's outputs."""
    images = digits[0]
    samples = write_npz(tmp_path / "samples.npz", images[:400])
    ref = write_npz(tmp_path / "ref.npz", images[400:1000])
    result = run_cli(tmp_path, net, "--samples", samples, "--ref", ref, "--batch-size", "64")
    fake = extract_features(net, [images[:400]], progress=False)
    real = extract_features(net, [images[400:1000]], progress=False)
    assert result["fid"] == pytest.approx(fid_from_features(fake["pool"], real["pool"]), rel=1e-4)
    assert result["sfid"] == pytest.approx(fid_from_features(fake["spatial"], real["spatial"]), rel=1e-4)
    assert (result["precision"], result["recall"]) == pytest.approx(
        precision_recall(real["pool"], fake["pool"], device="cpu"), abs=0.01
    )
    assert result["fid"] > 0 and 0 < result["precision"] <= 1


def test_fid_grows_with_image_noise(tmp_path, net, digits):
    images = digits[0][:400]
    ref = load_reference(write_npz(tmp_path / "ref.npz", images), net, progress=False)
    rng = np.random.default_rng(1)
    fids = []
    for sigma in (0, 10, 30, 60, 120):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).round().astype(np.uint8)
        feats = npz_features(net, write_npz(tmp_path / f"noisy{sigma}.npz", noisy), progress=False)
        fids.append(fid_from_features(feats["pool"], ref.pool_features))
    assert fids[0] < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), fids


def test_folder_reference_and_saved_reference(tmp_path, net, digits):
    """A folder of the same images (PNG, some wider with a border) gives the npz reference's numbers;
    --save-ref writes a reference that reproduces them."""
    images = digits[0][:120]
    folder = tmp_path / "real" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        pad = 8 if i % 3 == 0 else 0  # centre crop must remove the border
        canvas = np.full((32, 32 + 2 * pad, 3), 255, np.uint8)
        canvas[:, pad : pad + 32] = im
        Image.fromarray(canvas).save(folder / f"{i:04d}.png")
    samples = write_npz(tmp_path / "samples.npz", digits[0][200:320])
    from_npz = run_cli(tmp_path, net, "--samples", samples, "--ref", write_npz(tmp_path / "ref.npz", images))
    saved = tmp_path / "ref_stats.npz"
    from_dir = run_cli(tmp_path, net, "--samples", samples, "--ref", tmp_path / "real", "--save-ref", saved)
    from_saved = run_cli(tmp_path, net, "--samples", samples, "--ref", saved)
    for key in ("fid", "sfid", "precision", "recall", "inception_score"):
        assert from_dir[key] == pytest.approx(from_npz[key], rel=1e-6), key
        assert from_saved[key] == pytest.approx(from_npz[key], rel=1e-6), key
    assert set(np.load(saved).files) == {"mu", "sigma", "mu_s", "sigma_s", "pool_features", "meta"}


def test_folder_crops_larger_images(tmp_path, net, digits):
    folder = tmp_path / "big"
    folder.mkdir()
    for i, im in enumerate(digits[0][:20]):
        Image.fromarray(np.kron(im, np.ones((2, 3, 1), np.uint8))).save(folder / f"{i}.jpg")  # 64×96
    ref = load_reference(folder, net, resolution=32, workers=0, progress=False)
    assert ref.num_images == 20 and ref.pool_features.shape == (20, 32)


def test_adm_reference_statistics_take_precedence(tmp_path, net, digits):
    """ADM reference batches carry mu/sigma of more images than arr_0: FID uses the file's statistics,
    precision/recall the features of arr_0."""
    images = digits[0]
    other = extract_features(net, [images[1000:1700]], progress=False)
    ref_path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(
        ref_path,
        arr_0=images[400:700],
        mu=other["pool"].mean(0),
        sigma=np.cov(other["pool"], rowvar=False),
        mu_s=other["spatial"].mean(0),
        sigma_s=np.cov(other["spatial"], rowvar=False),
    )
    samples = write_npz(tmp_path / "samples.npz", images[:300])
    result = run_cli(tmp_path, net, "--samples", samples, "--ref", ref_path)
    fake = extract_features(net, [images[:300]], progress=False)
    assert result["fid"] == pytest.approx(fid_from_features(fake["pool"], other["pool"]), rel=1e-4)
    assert result["num_reference"] == 300  # P/R from arr_0
    ref = load_reference(ref_path, net, with_features=False, progress=False)  # stats only: arr_0 not read
    assert ref.pool_features is None
    assert frechet_distance(ref.pool, ref.pool) == pytest.approx(0, abs=1e-6)


def test_statistics_only_reference_skips_precision_recall(tmp_path, net, digits):
    feats = extract_features(net, [digits[0][:300]], progress=False)
    ref_path = tmp_path / "stats.npz"
    np.savez(ref_path, mu=feats["pool"].mean(0), sigma=np.cov(feats["pool"], rowvar=False))
    result = run_cli(tmp_path, net, "--samples", write_npz(tmp_path / "s.npz", digits[0][300:500]), "--ref", ref_path)
    assert result["fid"] > 0 and set(result["skipped"]) == {"sfid", "pr"} and result["num_reference"] is None


def test_bad_input_exits_2_with_the_file_named(tmp_path, net, digits, capsys):
    samples = write_npz(tmp_path / "s.npz", digits[0][:20])
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    assert cli.main(["--samples", str(samples), "--ref", str(tmp_path / "junk.npz")], net=net) == 2
    assert "junk.npz: needs images 'arr_0' or statistics 'mu'/'sigma'" in capsys.readouterr().err
    assert cli.main(["--samples", str(samples), "--ref", str(tmp_path / "missing.npz")], net=net) == 2
    assert "reference not found" in capsys.readouterr().err
    np.save(tmp_path / "single.npy", np.zeros(3))
    assert cli.main(["--samples", str(samples), "--ref", str(tmp_path / "single.npy")], net=net) == 2
    assert "single.npy: expected an .npz archive" in capsys.readouterr().err
    assert cli.main(["--samples", str(samples), "--ref", str(samples), "--inception", str(tmp_path / "none.pth")]) == 2
    assert "none.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--samples", str(samples), "--ref", str(samples)])
    assert exit_.value.code == 2 and "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
