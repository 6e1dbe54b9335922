"""Checkpoints that survive kills: write everything, agree, then publish.

    RUN_DIR/ckpt/
      latest                      tag of the newest complete checkpoint (moved last, atomically)
      step_00005000/
        <DeepSpeed engine files>  model / optimizer / scheduler state of every rank
        ema/rank_00000.safetensors   this rank's EMA shards            (ema.py)
        client/rank_00000.pt      this rank's loader state and RNG states
        meta.json                 step, images seen, world size, ZeRO stage, config + hash, file sizes:
                                  written by rank 0 only after every rank has written and fsynced
                                  its files, so it is the completion marker
      universal/step_00005000/    DeepSpeed universal form, made when the world size or stage changed

A checkpoint is complete when meta.json parses and every file it lists exists with its size. Resume
"auto" takes the newest complete one and skips (and later deletes) incomplete ones.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

CKPT_DIR = "ckpt"
META = "meta.json"
POINTER = "latest"
_TAG = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = re.compile(r"(?:pp_rank_|rank_)0*(\d+)[_.]")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (unreadable, incomplete, another configuration)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


#################################################################################
#                              Durable small writes                             #
#################################################################################

def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file, fsync it, rename over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _owner(filename: str) -> int:
    """The rank that wrote a checkpoint file: rank-numbered names, else rank 0."""
    m = _RANK_FILE.search(filename)
    return int(m.group(1)) if m else 0


def fsync_own_files(ckpt_dir: Path, rank: int, own: list[Path]) -> None:
    """fsync what this rank wrote: its DeepSpeed state files (complete: DeepSpeed's save ends in a
    barrier) and its own files; rank 0 also the directories. Other ranks' files may still be in flight
    (under temporary names), so nothing is fsynced by listing alone."""
    for name in os.listdir(ckpt_dir):
        if name.endswith("_states.pt") and _owner(name) == rank:
            fsync_path(ckpt_dir / name)
    for f in own:
        fsync_path(f)
    if rank == 0:
        for d in (ckpt_dir / "ema", ckpt_dir / "client", ckpt_dir):
            fsync_path(d)


#################################################################################
#                              Finding checkpoints                              #
#################################################################################

def read_meta(ckpt_dir: str | Path) -> dict:
    """meta.json of a checkpoint, with every listed file present at its size; CheckpointError names
    the file that is missing, truncated or unreadable."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {path} is missing (a save that did "
                              f"not finish on every rank)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    for rel, size in meta.get("files", {}).items():
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} has {f.stat().st_size} bytes, {size} were written "
                                  f"(truncated or replaced)")
    return meta


def list_tags(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step_* directory under root, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), root / d) for d in os.listdir(root) if (m := _TAG.match(d)) and (root / d).is_dir()]
    return sorted(found)


def newest_complete(root: str | Path, log=print) -> Path | None:
    for step, path in reversed(list_tags(root)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            log(f"skipping checkpoint {path}: {e}")
    return None


def resolve_resume(run_dir: str | Path, resume: str, log=print) -> Path | None:
    """The checkpoint to start from: "auto" → newest complete in run_dir (None if there is none),
    "none" → None, else the given checkpoint directory (which must be complete)."""
    root = Path(run_dir) / CKPT_DIR
    if resume == "none":
        return None
    if resume == "auto":
        return newest_complete(root, log)
    path = Path(resume)
    if path.is_dir() and (path / POINTER).is_file():          # a ckpt/ root: follow its pointer
        path = path / (path / POINTER).read_text().strip()
    read_meta(path)
    return path


def rotate(root: str | Path, keep_last: int, log=print) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete ones older than the
    newest complete one (left by a crash); also their universal conversions."""
    tags = list_tags(root)
    complete = []
    for step, path in tags:
        try:
            read_meta(path)
            complete.append((step, path))
        except CheckpointError:
            pass
    if not complete:
        return
    keep = {p for _, p in complete[-keep_last:]}
    newest = complete[-1][0]
    for step, path in tags:
        if path in keep or step > newest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(Path(root) / "universal" / path.name, ignore_errors=True)
        log(f"removed checkpoint {path}")


def abandon_newer(root: str | Path, step: int, log=print) -> None:
    """Resuming a run from one of its older checkpoints starts a new branch: the newer complete
    checkpoints move to ckpt/abandoned-<time>/ (kept, but invisible to resume "auto") and the pointer
    goes back. (Newer incomplete ones are debris of a crash: saves replace them, rotation removes them.)"""
    root = Path(root)
    newer = [path for s, path in list_tags(root) if s > step and (path / META).exists()]
    if not newer:
        return
    aside = root / f"abandoned-{int(time.time())}"
    aside.mkdir()
    for path in newer:
        os.replace(path, aside / path.name)
    atomic_write(root / POINTER, tag_for(step).encode())
    log(f"resuming from step {step}: moved the newer checkpoints {[p.name for p in newer]} to {aside}")


#################################################################################
#                              Per-rank client state                            #
#################################################################################

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#################################################################################
#                                  Save / load                                  #
#################################################################################

def _all_ok(ok: bool) -> bool:
    """True on every rank iff `ok` on every rank (a rank that failed to write must not let the others
    publish the checkpoint)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(engine, ema, run_dir: str | Path, step: int, *, client: dict, meta: dict, keep_last: int,
         log=print) -> Path:
    """Write a complete checkpoint of `step` on every rank, then publish it (meta.json, pointer) and
    rotate. `client` is this rank's state (loader, counters); `meta` rank 0's run description."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / CKPT_DIR
    tag = tag_for(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():                        # an incomplete save of this step from a crashed run
            shutil.rmtree(path)
    dist.barrier()
    t0 = time.time()
    ds_client = {"universal_checkpoint_info": {}} if engine.zero_optimization_stage() < 3 else {}
    engine.save_checkpoint(str(root), tag=tag, client_state=ds_client, save_latest=False)
    ok = True
    try:
        own = [path / "ema" / f"rank_{rank:05d}.safetensors", path / "client" / f"rank_{rank:05d}.pt"]
        for f in own:
            f.parent.mkdir(exist_ok=True)
        ema.save(own[0])
        torch.save({**client, "rng": rng_state(), "rank": rank, "world_size": world}, own[1])
        _fault_point("save", rank, step, path)
        fsync_own_files(path, rank, own)
    except Exception as e:  # report, then let every rank learn that this checkpoint is not complete
        ok = False
        log(f"rank {rank}: writing checkpoint {path} failed: {e!r}")
    if not _all_ok(ok):
        raise CheckpointError(f"checkpoint {path} was not written by every rank; it stays incomplete")
    if rank == 0:
        files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
        meta = {**meta, "step": step, "tag": tag, "world_size": world,
                "zero_stage": engine.zero_optimization_stage(), "files": files, "saved_at": time.time()}
        atomic_write(path / META, json.dumps(meta, indent=1, default=str).encode())
        atomic_write(root / POINTER, tag.encode())
        rotate(root, keep_last, log)
    dist.barrier()
    log(f"saved checkpoint {path} ({time.time() - t0:.1f} s)")
    return path


def needs_universal(meta: dict, world_size: int, zero_stage: int) -> bool:
    return meta["world_size"] != world_size or meta["zero_stage"] != zero_stage


def make_universal(ckpt_dir: str | Path, run_dir: str | Path, log=print) -> Path:
    """DeepSpeed's universal form of a checkpoint, so another world size or ZeRO stage can load it:
    converted once by rank 0 into RUN_DIR/ckpt/universal/<tag> (the source may be another run's, and
    read-only). Returns the directory to load from (its parent is the load_dir, its name the tag)."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    out = Path(run_dir) / CKPT_DIR / "universal" / ckpt_dir.name
    done = out / ".complete"
    error = None
    if dist.get_rank() == 0 and not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"converting {ckpt_dir} to a universal checkpoint in {out}")
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            error = f"ds_to_universal failed on {ckpt_dir} (exit {proc.returncode}): {proc.stderr[-2000:]}"
        else:
            atomic_write(done, b"")
    if not _all_ok(error is None):
        raise CheckpointError(error or f"universal conversion of {ckpt_dir} failed on rank 0")
    return out


def load(engine, ckpt_dir: str | Path, meta: dict, *, universal_dir: Path | None, log=print) -> dict:
    """Restore the engine and this rank's RNG states; returns this rank's client state. For another
    world size (universal_dir given): rank 0's loader state, RNG states only where the rank existed."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank()
    load_from = universal_dir or ckpt_dir
    try:
        got, _ = engine.load_checkpoint(str(load_from.parent), tag=load_from.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise CheckpointError(f"cannot load the DeepSpeed state of {load_from}: {e!r} (at {where.filename}:"
                              f"{where.lineno}: {where.line})") from e
    if got is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {load_from}")
    same_rank = ckpt_dir / "client" / f"rank_{rank:05d}.pt"
    source = same_rank if universal_dir is None or same_rank.exists() else ckpt_dir / "client" / "rank_00000.pt"
    try:
        client = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {source}: {e!r}") from None
    if source == same_rank:
        set_rng_state(client["rng"])
    else:
        log(f"rank {rank}: no saved RNG state for this rank (checkpoint of {meta['world_size']} ranks): reseeded")
    return client


def load_ema(ema, ckpt_dir: str | Path, meta: dict, *, same_layout: bool) -> None:
    """This rank's EMA shards: its own file when the layout is the one saved, else re-cut from all files."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    files = sorted(glob.glob(str(ckpt_dir / "ema" / "rank_*.safetensors")))
    if len(files) != meta["world_size"]:
        raise CheckpointError(f"{ckpt_dir / 'ema'} holds {len(files)} EMA files, the checkpoint was "
                              f"written by {meta['world_size']} ranks")
    try:
        if same_layout:
            ema.load(ckpt_dir / "ema" / f"rank_{dist.get_rank():05d}.safetensors")
        else:
            ema.load_resharded(files)
    except RuntimeError as e:
        raise CheckpointError(str(e)) from None


#################################################################################
#                                Fault injection                                #
#################################################################################

def _fault_point(where: str, rank: int, step: int, path: Path) -> None:
    """For the crash tests: DITSCALE_TEST_HANG="save:RANK:STEP" makes that rank stop inside that save,
    after its files are written and before the ranks agree, so a test can kill -9 it there."""
    spec = os.environ.get("DITSCALE_TEST_HANG")
    if spec and spec == f"{where}:{rank}:{step}":
        (path / f".hang_rank_{rank}").write_text(str(os.getpid()))
        while True:
            time.sleep(1)
