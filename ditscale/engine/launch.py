"""The process group: the rank layout (`ditscale.runtime`, whichever launcher started us) plus the
rendezvous address, the device, and torch.distributed through DeepSpeed.

Rendezvous: deepspeed / torchrun export MASTER_ADDR/PORT; under srun the batch script does
(slurm/common.sh rendezvous_env); a single process takes a free local port. `init_distributed` exports the
torch names (RANK, LOCAL_WORLD_SIZE, ...) so every library (DeepSpeed, mosaicml-streaming) sees the same world.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

import torch

from ditscale import runtime


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed | torchrun | slurm | single (runtime.LAUNCHERS)
    job_tasks: int = 1  # a SLURM batch shell's task count (runtime.RankEnv.job_tasks)


def free_port() -> int:
    """An unused TCP port on this host (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env=None) -> DistEnv:
    """The rank layout from the environment (`runtime.rank_env`) and the rendezvous address."""
    env = os.environ if env is None else env
    r = runtime.rank_env(env)
    if r.launcher == "slurm" and r.world_size > 1 and "MASTER_ADDR" not in env:
        raise RuntimeError(
            "srun task without MASTER_ADDR: export MASTER_ADDR/MASTER_PORT in the batch "
            "script (slurm/common.sh rendezvous_env does)"
        )
    port = env.get("MASTER_PORT") or (free_port() if r.launcher == "single" else 29500)
    return DistEnv(
        r.rank,
        r.local_rank,
        r.world_size,
        r.local_world_size,
        env.get("MASTER_ADDR", "127.0.0.1"),
        int(port),
        r.launcher,
        r.job_tasks,
    )


def pick_device(dist_env: DistEnv, want: str = "auto") -> torch.device:
    """`runtime.pick_device` for this rank: cuda:LOCAL_RANK when CUDA is available (or asked), else cpu;
    $DITSCALE_DEVICE overrides `want`."""
    return runtime.pick_device(
        runtime.RankEnv(
            dist_env.rank, dist_env.world_size, dist_env.local_rank, dist_env.local_world_size, dist_env.launcher
        ),
        want,
    )


def init_distributed(dist_env: DistEnv, device: torch.device, timeout_min: int = 30) -> None:
    """Export the torch launcher variables and start the process group (nccl on GPUs, gloo on CPU)."""
    os.environ.update(
        RANK=str(dist_env.rank),
        LOCAL_RANK=str(dist_env.local_rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_min),
        rank=dist_env.rank,
        world_size=dist_env.world_size,
    )
    if device.type == "cpu":
        _unlink_shm_buffer(dist_env)


def _unlink_shm_buffer(dist_env: DistEnv) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm buffer per rank (~70 MB) and never unlinks it, so every
    CPU run, and every killed one, leaks them into RAM-backed /dev/shm. Once every rank has mapped every
    buffer (init returned on all ranks: barrier), the names can go; the mappings live on."""
    torch.distributed.barrier()
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{dist_env.master_addr}_"
        f"{dist_env.master_port}_{dist_env.rank}"
    )
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def shutdown(*, together: bool = False) -> None:
    """Destroy the process groups. together: every rank got here the same way (a finished run), so a barrier
    first lets them tear down at once: rank 0, which hosts the rendezvous store, does not exit while the
    others still destroy their groups (a rank exited with SIGABRT, "terminate called without an active
    exception", after a finished run on a loaded CI machine). Never after an error: a peer may be inside
    a collective that will not complete."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if together and torch.distributed.get_world_size() > 1:
            try:
                torch.distributed.barrier()
            except RuntimeError:  # a peer already gone: nothing left to wait for
                pass
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code` after the interpreter's Python-level exit work (non-daemon threads
    joined, atexit handlers such as streaming's shared-memory cleanup, output flushed) but without its
    finalization, which destroys torch.distributed's C++ objects while their threads (gloo's run loops, the
    rendezvous store's server on rank 0) still run. Finished 2-rank CPU runs now and then lost a rank to
    SIGABRT there ("terminate called without an active exception", after the run's last line): a complete
    run reported as a crash, which the SLURM script requeues. The kernel releases what is left (sockets,
    mappings, file locks)."""
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's first exit step (private, since 3.4)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader is gone
            pass
    os._exit(code)
