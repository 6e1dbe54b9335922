"""Who this process is in the job: rank, world size, local rank, device. One set of rules for the trainer,
the sampler and data_prep.

Launchers, in the order they are recognised:
- deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE (and CROSS_RANK);
- torchrun (also torchrun inside an srun step: its variables win): RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE;
- an srun job step (SLURM_STEP_ID set): SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS),
  SLURM_LOCALID, tasks per node from SLURM_NTASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE ("8(x4)");
- an sbatch batch shell without srun (SLURM_JOB_ID, no SLURM_STEP_ID): one process, rank 0 of 1. Its
  SLURM_PROCID=0 / SLURM_NTASKS=N describe the allocation, not this process: taking them as the rank
  would make it "rank 0 of N" and wait for N - 1 ranks that never start. `job_tasks` keeps N (what
  srun will start) for checks that plan for the job;
- nothing: one process.
SLURM array tasks are not ranks: data_prep reads them itself (data_prep.slices).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

LAUNCHERS = ("deepspeed", "torchrun", "slurm", "single")


@dataclass(frozen=True)
class RankEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"  # one of LAUNCHERS; "slurm" is an srun step, a batch shell is "single"
    job_tasks: int = 1  # the SLURM job's task count seen from its batch shell, else world_size


def _ints(env: Mapping[str, str], keys: dict[str, str | None]) -> dict[str, int]:
    """{key: int(env[key] or its default)}; ValueError naming the variable that is not an integer."""
    out = {}
    for key, default in keys.items():
        value = env.get(key) or default
        try:
            out[key] = int(str(value).split("(")[0].split(",")[0])
        except ValueError:
            raise ValueError(f"launcher variable {key}={value!r} is not an integer") from None
    return out


def _tasks_per_node(env: Mapping[str, str]) -> int:
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            return _ints(env, {key: None})[key]
    return 1


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """This process's place in the job (see the module docstring); ValueError on inconsistent variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "LOCAL_SIZE" in env or "CROSS_RANK" in env else "torchrun"
        v = _ints(
            env,
            {
                "RANK": None,
                "WORLD_SIZE": None,
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": env.get("LOCAL_SIZE") or env["WORLD_SIZE"],
            },
        )
        found = RankEnv(v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"], v["LOCAL_WORLD_SIZE"], launcher, v["WORLD_SIZE"])
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        v = _ints(
            env, {"SLURM_PROCID": None, "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": env.get("SLURM_NTASKS") or "1"}
        )
        world = v["SLURM_STEP_NUM_TASKS"]
        found = RankEnv(v["SLURM_PROCID"], world, v["SLURM_LOCALID"], _tasks_per_node(env), "slurm", world)
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS / SLURM_NTASKS")
    else:
        return RankEnv(job_tasks=_ints(env, {"SLURM_NTASKS": "1"})["SLURM_NTASKS"])
    if not 0 <= found.rank < found.world_size:
        raise ValueError(f"{names[0]}={found.rank} is outside 0..{names[1]}-1={found.world_size - 1}")
    return found


def pick_device(env: RankEnv, want: str = "auto", *, share_gpus: bool = False):
    """The torch device of this rank. want: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cuda,
    cpu, or an explicit device such as cuda:1; $DITSCALE_DEVICE (slurm/common.sh sets it to cpu on
    GPU-less nodes) overrides it. A local rank beyond the visible GPUs is an error (one task per GPU),
    unless share_gpus (data_prep's encode workers): then ranks wrap around the GPUs. Sets the CUDA device."""
    import torch

    want = os.environ.get("DITSCALE_DEVICE") or want
    if want not in ("auto", "cuda", "cpu"):
        try:
            device = torch.device(want)
        except RuntimeError:
            raise ValueError(f"device {want!r}: expected auto, cuda, cpu or a torch device such as cuda:1") from None
    elif want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {want!r} but CUDA is not available on this host")
        n = torch.cuda.device_count()
        if env.local_rank >= n and not share_gpus:
            raise RuntimeError(
                f"local rank {env.local_rank} but only {n} visible GPU(s) on this host: start one task per GPU"
            )
        device = torch.device("cuda", env.local_rank % n)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
