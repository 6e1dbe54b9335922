"""Which part of the input a worker encodes: deterministic, disjoint, covering slices.

The sorted input list is cut into `num_slices` contiguous slices; worker w of W takes slices w, w + W,
w + 2W, …, so more slices than workers makes a crash cost less. The worker's place comes from flags,
else torchrun / the deepspeed launcher, else a SLURM array (SLURM_ARRAY_TASK_ID relative to
SLURM_ARRAY_TASK_MIN, stepped, out of SLURM_ARRAY_TASK_COUNT), else the tasks of an srun step, else a
single worker (also an sbatch shell without srun); ranks follow `ditscale.runtime`'s rules.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence, TypeVar

from ditscale.runtime import rank_env

T = TypeVar("T")


def slice_bounds(total: int, num_slices: int, index: int) -> tuple[int, int]:
    """[start, stop) of slice `index`: sizes differ by at most one."""
    if num_slices < 1 or not 0 <= index < num_slices:
        raise ValueError(f"slice {index} of {num_slices} does not exist")
    return total * index // num_slices, total * (index + 1) // num_slices


def take_slice(items: Sequence[T], num_slices: int, index: int) -> Sequence[T]:
    start, stop = slice_bounds(len(items), num_slices, index)
    return items[start:stop]


def slices_of_worker(worker: int, num_workers: int, num_slices: int) -> list[int]:
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} outside [0, {num_workers})")
    return list(range(worker, num_slices, num_workers))


def resolve_worker(
    worker: int | None = None, num_workers: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int, str]:
    """(worker index, number of workers, where it came from)."""
    env = os.environ if env is None else env
    if worker is not None or num_workers is not None:
        if worker is None or num_workers is None:
            raise ValueError("--worker and --num-workers go together")
        found = (worker, num_workers, "flags")
    elif (ranks := rank_env(env)).launcher in ("deepspeed", "torchrun"):
        found = (ranks.rank, ranks.world_size, f"{ranks.launcher} RANK/WORLD_SIZE")
    elif "SLURM_ARRAY_TASK_ID" in env:
        task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
        found = ((task - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"]), "SLURM array")
    elif ranks.launcher == "slurm" and ranks.world_size > 1:
        found = (ranks.rank, ranks.world_size, "srun SLURM_PROCID/SLURM_NTASKS")
    else:
        found = (0, 1, "single worker")
    if not 0 <= found[0] < found[1]:
        raise ValueError(f"worker {found[0]} outside [0, {found[1]}) (from {found[2]})")
    return found
