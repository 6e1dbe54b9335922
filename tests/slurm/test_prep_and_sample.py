"""slurm/prep_latents.sh (array job + dependent merge) and slurm/sample.sh (all tasks of a 2-node job)
on the local cluster, checked against the same work done in one process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_prep_latents_array_then_merge(slurm_cluster, tmp_path):
    """2 array tasks encode 3 slices on CPU; the merge + verify job runs after both (afterok)."""
    from data_prep.testing import write_image_folder

    images = write_image_folder(str(tmp_path / "images"), classes=3, per_class=4, min_side=16, max_side=24)
    env = {
        **slurm_cluster.env,
        "INPUT": images,
        "OUT": str(tmp_path / "ds"),
        "VAE": "none",
        "RESOLUTION": "8",
        "WORKERS": "2",
        "NUM_SLICES": "3",
        "GPUS_PER_NODE": "0",
        "LOG_DIR": str(tmp_path / "logs"),
        "EXTRA": "--decode-workers 0",
        "SBATCH_ARGS": f"--partition={slurm_cluster.partition} --cpus-per-task=1 --time=10",
    }
    submit = subprocess.run(["bash", "slurm/prep_latents.sh"], cwd=REPO, env=env, text=True, capture_output=True)
    assert submit.returncode == 0, submit.stderr + submit.stdout
    array_id, merge_id = submit.stdout.split()[-2:]
    merge = slurm_cluster.wait(merge_id, timeout=300)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "logs").iterdir()))
    assert merge.state == "COMPLETED", logs
    assert merge.fields["Dependency"] == "(null)" and "OK: 3 shards, 12 samples" in logs, logs
    encode_logs = sorted((tmp_path / "logs").glob(f"encode-{array_id}_*.out"))
    assert len(encode_logs) == 2 and "worker 1/2 (SLURM array): slices [1] of 3" in logs, logs
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["num_samples"] == 12 and len(meta["slices"]) == 3


def test_prep_latents_refuses_missing_input(slurm_cluster, tmp_path):
    env = {**slurm_cluster.env, "INPUT": str(tmp_path / "nope"), "OUT": str(tmp_path / "ds"), "VAE": "none"}
    out = subprocess.run(["bash", "slurm/prep_latents.sh"], cwd=REPO, env=env, text=True, capture_output=True)
    assert out.returncode == 2 and f"INPUT '{tmp_path / 'nope'}' does not exist" in out.stderr
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""


def test_sample_over_two_nodes_equals_one_process(slurm_cluster, tmp_path, two_node_run, tiny_dataset):
    """sample.sh on 2 nodes x 1 task writes the ADM .npz; one in-process run with the same flags agrees."""
    from ditscale.engine.export import export
    from ditscale.sample import main as sample_main

    (weights,) = [
        p
        for p in export(two_node_run[1] / "ckpt", tmp_path / "export" / "ema.safetensors", log=lambda *a: None)
        if p.suffix == ".safetensors"
    ]
    flags = ["--sampler", "ddim", "--steps", "2"]
    env = {
        "CKPT": str(weights),
        "OUT": str(tmp_path / "npz"),
        "NUM_SAMPLES": "6",
        "BATCH_SIZE": "2",
        "DATASET": str(tiny_dataset),
        "GPUS_PER_NODE": "0",
    }
    out = tmp_path / "sample-%j.out"
    job_id = slurm_cluster.sbatch(
        f"--partition={slurm_cluster.partition}",
        "--gres=none",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={out}",
        "slurm/sample.sh",
        *flags,
        env=env,
    )
    job = slurm_cluster.wait(job_id, timeout=300)
    text = Path(str(out).replace("%j", job_id)).read_text()
    assert job.state == "COMPLETED", text
    assert "2 task(s)" in text and "done:" in text, text
    assert len(list((tmp_path / "npz" / "chunks").glob("*.npz"))) == 3
    with np.load(tmp_path / "npz" / "samples_6x8x8x3.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8

    assert (
        sample_main(
            [
                "--ckpt",
                str(weights),
                "--npz-out",
                str(tmp_path / "one"),
                "--num-samples",
                "6",
                "--batch-size",
                "2",
                "--cfg-scale",
                "1.5",
                "--dataset",
                str(tiny_dataset),
                "--device",
                "cpu",
                "--no-progress",
                *flags,
            ]
        )
        == 0
    )
    with np.load(tmp_path / "one" / "samples_6x8x8x3.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
