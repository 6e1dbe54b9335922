"""ditscale.runtime: one set of launcher rules (deepspeed launcher, torchrun, srun step, sbatch shell without
srun) for the trainer, the sampler and data_prep, and the device each rank takes."""

import json

import pytest
import torch

from data_prep.slices import resolve_worker
from ditscale.engine.launch import detect
from ditscale.runtime import RankEnv, pick_device, rank_env

DEEPSPEED = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "1",
    "MASTER_ADDR": "n1",
    "MASTER_PORT": "1234",
}
TORCHRUN = {
    "RANK": "2",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "2",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "h",
    "MASTER_PORT": "29500",
}
SRUN_STEP = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "MASTER_ADDR": "node1",
    "MASTER_PORT": "15042",
}
SBATCH_SHELL = {
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "0",
    "SLURM_TASKS_PER_NODE": "8(x2)",
}
TORCHRUN_IN_SRUN = {
    **SRUN_STEP,
    "SLURM_PROCID": "0",
    "SLURM_STEP_NUM_TASKS": "1",
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
}


@pytest.mark.parametrize(
    "environ, want",
    [
        ({}, RankEnv()),
        (DEEPSPEED, RankEnv(3, 8, 1, 2, "deepspeed", 8)),
        (TORCHRUN, RankEnv(2, 4, 2, 4, "torchrun", 4)),
        (SRUN_STEP, RankEnv(9, 16, 1, 8, "slurm", 16)),
        (SBATCH_SHELL, RankEnv(0, 1, 0, 1, "single", 16)),  # the allocation's 16 tasks are not us
        (TORCHRUN_IN_SRUN, RankEnv(1, 2, 1, 2, "torchrun", 2)),
        ({"SLURM_STEP_ID": "3", "SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, RankEnv(2, 3, 0, 1, "slurm", 3)),
    ],
    ids=["single", "deepspeed", "torchrun", "srun-step", "sbatch-shell", "torchrun-in-srun", "srun-minimal"],
)
def test_rank_env_of_each_launcher(environ, want):
    assert rank_env(environ) == want


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside 0..WORLD_SIZE-1=1"),
        ({"RANK": "a", "WORLD_SIZE": "2"}, "RANK='a' is not an integer"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID=4 is outside"),
    ],
)
def test_inconsistent_variables_name_the_variable(environ, match):
    with pytest.raises(ValueError, match=match):
        rank_env(environ)


def test_trainer_sampler_and_data_prep_agree():
    """The trainer's launch env, the sampler's ranks and data_prep's workers come from the same rules."""
    for environ in (DEEPSPEED, TORCHRUN, SRUN_STEP, SBATCH_SHELL, TORCHRUN_IN_SRUN):
        r = rank_env(environ)
        d = detect(environ)
        assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (
            r.rank,
            r.world_size,
            r.local_rank,
            r.local_world_size,
            r.launcher,
        )
        assert resolve_worker(env=environ)[:2] == (r.rank, r.world_size)
    assert detect(SBATCH_SHELL).job_tasks == 16  # `train --check` in the batch shell plans for 16 ranks


def test_device(monkeypatch):
    monkeypatch.delenv("DITSCALE_DEVICE", raising=False)
    assert pick_device(RankEnv(), "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(RankEnv(), "auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device(RankEnv(), "cuda")
    with pytest.raises(ValueError, match="device 'gpu0'"):
        pick_device(RankEnv(), "gpu0")
    monkeypatch.setenv("DITSCALE_DEVICE", "cpu")
    assert pick_device(RankEnv(), "cuda") == torch.device("cpu")


def test_sampler_in_an_sbatch_shell_is_one_process(tmp_path, monkeypatch):
    """`python -m ditscale.sample --npz-out` run in the batch shell (no srun) does all chunks itself; taking
    SLURM_PROCID=0 / SLURM_NTASKS=4 as its rank, it would wait for three ranks that never start."""
    from safetensors.torch import save_file

    from ditscale.models import build_dit
    from ditscale.sample import main

    model = build_dit("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=3, num_classes=2)
    save_file(model.state_dict(), tmp_path / "ema.safetensors")
    (tmp_path / "ema.json").write_text(json.dumps({"model": model.config}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "DITSCALE_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SBATCH_SHELL.items():
        monkeypatch.setenv(key, value)
    args = [
        "--ckpt",
        str(tmp_path / "ema.safetensors"),
        "--vae",
        "none",
        "--steps",
        "2",
        "--no-progress",
        "--npz-out",
        str(tmp_path / "npz"),
        "--num-samples",
        "6",
        "--batch-size",
        "2",
        "--stall-timeout",
        "20",
    ]
    assert main(args) == 0
    assert len(list((tmp_path / "npz" / "chunks").glob("*.npz"))) == 3
