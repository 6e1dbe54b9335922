"""`python -m ditscale.sample`: grids and .npz from a checkpoint file, seed-reproducible, resumable, across ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditscale.models import build_dit
from ditscale.sample import main

from helpers import randomize

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pixel-mode (3-channel, 8×8, 5 classes) model saved as the trainer exports: safetensors + config."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("export")
    model = randomize(
        build_dit("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=5)
    )
    save_file(model.state_dict(), root / "ema.safetensors")
    (root / "config.json").write_text(json.dumps({"model": {"num_heads": 2, "class_dropout_prob": 0.1}}))
    (root / "dataset.json").write_text(
        json.dumps({"classes": ["zero", "one", "two", "three", "four"], "vae": "none", "scale_factor": 1.0})
    )
    return root


def common(ckpt, *extra):
    return ["--ckpt", str(ckpt), "--steps", "4", "--no-progress", "--vae", "none", *extra]


def png(path):
    return np.asarray(Image.open(path))


def npz(directory):
    (path,) = Path(directory).glob("samples_*.npz")
    with np.load(path) as data:
        return path, data["arr_0"], data["arr_1"]


def test_grid_is_seed_reproducible_and_labelled(ckpt, tmp_path):
    grid = common(ckpt, "--classes", "4,1", "--num-per-class", "3", "--batch-size", "4")
    assert main([*grid, "--seed", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert main([*grid, "--seed", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert main([*grid, "--seed", "2", "--out", str(tmp_path / "c.png")]) == 0
    assert main([*grid, "--seed", "1", "--dataset", str(ckpt), "--out", str(tmp_path / "d.png")]) == 0
    a, b, c, d = (png(tmp_path / f"{k}.png") for k in "abcd")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert d.shape[1] > a.shape[1] and np.array_equal(a[:, -100:], d[:, -100:])  # names widen the label column


def test_npz_run_resumes_without_duplicates_or_gaps(ckpt, tmp_path):
    run = common(
        ckpt,
        "--npz-out",
        str(tmp_path / "s"),
        "--num-samples",
        "10",
        "--batch-size",
        "4",
        "--cfg-scale",
        "1.5",
        "--seed",
        "3",
    )
    assert main(run) == 0
    path, images, labels = npz(tmp_path / "s")
    assert path.name == "samples_10x8x8x3.npz" and images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 5 for i in range(10)]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["chunk_size"] == 4 and manifest["cfg_scale"] == 1.5
    for p in (path, tmp_path / "s" / "chunks" / "000001.npz"):
        p.unlink()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "chunks").iterdir()}
    assert main(run) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # done chunks untouched
    _, again, again_labels = npz(tmp_path / "s")
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert main([*run, "--labels", "random"]) == 2  # other settings: refused


def test_npz_feeds_the_evaluator(ckpt, tmp_path, capsys):
    from ditscale.evaluate.__main__ import main as evaluate
    from ditscale.evaluate.tiny import TinyFeatureNet

    assert (
        main(
            common(
                ckpt,
                "--npz-out",
                str(tmp_path),
                "--samples-per-class",
                "3",
                "--batch-size",
                "6",
                "--cfg-scale",
                "1.5",
                "--weights",
                "ema",
            )
        )
        == 0
    )
    path, _, labels = npz(tmp_path)
    assert np.bincount(labels).tolist() == [3] * 5
    capsys.readouterr()
    argv = ["--samples", str(path), "--ref", str(path), "--metrics", "fid,is", "--no-progress", "--device", "cpu"]
    assert evaluate(argv, net=TinyFeatureNet().eval()) == 0
    metrics = json.loads(path.with_suffix(".metrics.json").read_text())
    assert abs(metrics["fid"]) < 1e-3 and metrics["num_samples"] == 15
    sampling = metrics["sampling"]  # the .npz's own record of how it was made
    assert (sampling["cfg_scale"], sampling["sampler"], sampling["steps"], sampling["guide_channels"]) == (
        1.5,
        "ddpm",
        4,
        3,
    )
    assert (sampling["labels"], sampling["weights"], sampling["per_class_min"], sampling["per_class_max"]) == (
        "balanced",
        "ema",
        3,
        3,
    )
    with pytest.raises(SystemExit) as bad:
        main(common(ckpt, "--npz-out", str(tmp_path / "r"), "--samples-per-class", "3", "--labels", "random"))
    assert bad.value.code == 2


def test_random_labels_and_other_batch_sizes_give_the_same_samples(ckpt, tmp_path):
    base = common(ckpt, "--num-samples", "6", "--labels", "random", "--sampler", "ddim")
    assert main([*base, "--npz-out", str(tmp_path / "a"), "--batch-size", "6"]) == 0
    assert main([*base, "--npz-out", str(tmp_path / "b"), "--batch-size", "4"]) == 0
    _, a, la = npz(tmp_path / "a")
    _, b, lb = npz(tmp_path / "b")
    assert np.array_equal(la, lb) and len(set(la.tolist())) > 1
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float noise in batching only


def test_latent_mode_decodes_with_the_local_vae(ckpt, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).save_pretrained(tmp_path / "vae")
    model = randomize(build_dit("DiT-S/2", depth=1, input_size=4, num_classes=3))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"vae": str(tmp_path / "vae"), "scale_factor": 0.3, "classes": ["a", "b", "c"]})
    )
    args = [
        "--ckpt",
        str(tmp_path / "w.safetensors"),
        "--dataset",
        str(tmp_path),
        "--steps",
        "3",
        "--no-progress",
        "--classes",
        "0,2",
        "--num-per-class",
        "2",
        "--sampler",
        "ddim",
        "--guide-channels",
        "4",
    ]
    assert main([*args, "--out", str(tmp_path / "g.png")]) == 0
    grid = png(tmp_path / "g.png")
    assert grid.shape[0] == 2 + 2 * (64 + 2)  # 8×8 images shown at 64 px
    assert main([*args, "--scale-factor", "0.6", "--out", str(tmp_path / "h.png")]) == 0
    assert not np.array_equal(grid, png(tmp_path / "h.png"))


def test_bad_inputs_exit_2(ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(ckpt), "--classes", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--vae is required" in capsys.readouterr().err
    assert main(common(ckpt, "--classes", "1,9", "--out", str(tmp_path / "x.png"))) == 2
    assert "--classes [9] out of range" in capsys.readouterr().err
    assert main(common(tmp_path / "missing.pt", "--classes", "1", "--out", str(tmp_path / "x.png"))) == 2
    assert main(common(ckpt, "--classes", "1", "--vae", str(tmp_path), "--out", str(tmp_path / "x.png"))) == 2
    assert "cannot load a diffusers AutoencoderKL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(common(ckpt, "--classes", "1", "--out", "x.png", "--npz-out", "d"))
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(common(ckpt, "--guide-channels", "two", "--classes", "1", "--out", "x.png"))


def _launch(args, env_extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "ditscale.sample", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.distributed
def test_two_processes_and_a_kill(ckpt, tmp_path):
    """Two real ranks (torchrun-style variables) write the same .npz as one process; so does a run that is
    SIGKILLed after its first chunk, then rerun."""
    run = lambda out: common(
        ckpt,
        "--npz-out",
        str(tmp_path / out),
        "--num-samples",
        "9",
        "--batch-size",
        "2",
        "--steps",
        "60",
        "--stall-timeout",
        "120",
    )
    assert main(run("one")) == 0
    _, reference, ref_labels = npz(tmp_path / "one")
    ranks = [_launch(run("two"), {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (1, 0)]
    for p in ranks:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    _, images, labels = npz(tmp_path / "two")
    assert np.array_equal(images, reference) and np.array_equal(labels, ref_labels)

    killed = _launch(run("kill"), {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    chunks, deadline = tmp_path / "kill" / "chunks", time.time() + 120
    while not (chunks.is_dir() and any(chunks.glob("*.npz"))):
        assert time.time() < deadline and killed.poll() is None
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert 1 <= len(list(chunks.glob("*.npz"))) < 5
    assert main(run("kill")) == 0
    _, images, labels = npz(tmp_path / "kill")
    assert np.array_equal(images, reference) and np.array_equal(labels, ref_labels)
