"""The trainer under torchrun (the deepspeed launcher is every other test's; srun is tests/slurm's)."""

from __future__ import annotations

import sys
from pathlib import Path

from ds_launch import TINY, Run, child_env, ckpt, free_port, metrics


def test_torchrun_two_ranks(digits64, tmp_path):
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "ditscale.train",
        "--config",
        str(TINY),
        f"data.root={digits64}",
        f"run_dir={run_dir}",
        "train.max_steps=3",
        "train.ckpt_every=3",
    ]
    run = Run(cmd, tmp_path / "torchrun.log", child_env(), timeout=600)
    assert run.wait() == 0, run.text()[-5000:]
    assert "2 rank(s) on cpu" in run.text()
    assert sorted(metrics(run_dir)) == [1, 2, 3]
    assert (run_dir / "ckpt" / "latest").read_text().strip() == ckpt(run_dir, 3).name
    assert len(list((ckpt(run_dir, 3) / "ema").glob("rank_*.safetensors"))) == 2
