"""Who am I in the job: rank and world from whichever launcher started us, the device, the process group.

Launchers and what they set:
- deepspeed / torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (deepspeed: LOCAL_SIZE, torchrun:
  LOCAL_WORLD_SIZE);
- srun (one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS inside a job step; MASTER_ADDR/PORT
  come from the batch script (slurm/common.sh);
- nothing: one process on a free local port.
`init_distributed` exports the torch names (RANK, LOCAL_WORLD_SIZE, ...) so every library (DeepSpeed,
mosaicml-streaming) sees the same world.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str           # deepspeed | torchrun | slurm | single


def free_port() -> int:
    """An unused TCP port on this host (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_tasks_per_node(env) -> int:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("8(x4)")."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            return int(env[key].split("(")[0].split(",")[0])
    return 1


def detect(env=None) -> DistEnv:
    """The rank layout from the environment (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "LOCAL_SIZE" in env or "CROSS_RANK" in env else "torchrun"
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), local_world,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:      # inside an srun step, not the batch shell
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if world > 1 and "MASTER_ADDR" not in env:
            raise RuntimeError("srun task without MASTER_ADDR: export MASTER_ADDR/MASTER_PORT in the batch "
                               "script (slurm/common.sh rendezvous_env does)")
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world,
                       _slurm_tasks_per_node(env), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), "slurm")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def pick_device(dist_env: DistEnv, want: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (or asked), else cpu. $DITSCALE_DEVICE overrides `want`."""
    want = os.environ.get("DITSCALE_DEVICE") or want
    if want not in ("auto", "cuda", "cpu"):
        raise ValueError(f"DITSCALE_DEVICE / engine.device: expected auto, cuda or cpu, got {want!r}")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("engine.device=cuda but CUDA is not available on this host")
    n = torch.cuda.device_count()
    if dist_env.local_rank >= n:
        raise RuntimeError(f"local rank {dist_env.local_rank} but only {n} visible GPU(s) on this host: "
                           f"start one task per GPU")
    torch.cuda.set_device(dist_env.local_rank)
    return torch.device("cuda", dist_env.local_rank)


def init_distributed(dist_env: DistEnv, device: torch.device, timeout_min: int = 30) -> None:
    """Export the torch launcher variables and start the process group (nccl on GPUs, gloo on CPU)."""
    os.environ.update(RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank),
                      WORLD_SIZE=str(dist_env.world_size), LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
                      MASTER_ADDR=dist_env.master_addr, MASTER_PORT=str(dist_env.master_port))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_min), rank=dist_env.rank,
                               world_size=dist_env.world_size)
    if device.type == "cpu":
        _unlink_shm_buffer(dist_env)


def _unlink_shm_buffer(dist_env: DistEnv) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm buffer per rank (~70 MB) and never unlinks it, so every
    CPU run, and every killed one, leaks them into RAM-backed /dev/shm. Once every rank has mapped every
    buffer (init returned on all ranks: barrier), the names can go; the mappings live on."""
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{dist_env.master_addr}_"
            f"{dist_env.master_port}_{dist_env.rank}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
