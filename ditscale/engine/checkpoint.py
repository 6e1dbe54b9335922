"""Checkpoints that survive kills: write everything, agree, then publish.

    RUN_DIR/ckpt/
      latest                      tag of the newest complete checkpoint (moved last, atomically)
      step_00005000/
        <DeepSpeed engine files>  model / optimizer / scheduler state of every rank
        ema/rank_00000.safetensors   this rank's EMA shards            (ema.py)
        client/rank_00000.pt      this rank's loader state and RNG states
        meta.json                 step, images seen, world size, ZeRO stage, config + hash, and each
                                  file's size and xxh3-64 checksum (computed by the rank that wrote it,
                                  right after writing): written by rank 0 only after every rank has
                                  written and fsynced its files, so it is the completion marker
      universal/step_00005000/    DeepSpeed universal form, made when the world size or stage changed

A checkpoint is complete when meta.json parses and every file it lists exists with its size. Resume
"auto" takes the newest complete one whose checksums also match (every rank reads a share of the
files) and skips (and later deletes or sets aside) the others, naming the file that failed. A save first
checks that the previous checkpoint's size is free on every rank; a write that fails on any rank is
reported on every rank, leaves `latest` alone and removes the partial checkpoint (integrity.py).

    python -m ditscale.engine.checkpoint verify RUN_DIR|CKPT_DIR      # sizes and checksums, by hand
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

from ditscale.engine import integrity
from ditscale.engine.ema import zero_partition_padding
from ditscale.engine.signals import pause_for_test
from ditscale.files import atomic_write, fsync_path

CKPT_DIR = "ckpt"
META = "meta.json"
POINTER = "latest"
_TAG = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = re.compile(r"(?:pp_rank_|rank_)0*(\d+)[_.]")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (unreadable, incomplete, another configuration)."""


class SaveError(CheckpointError):
    """A checkpoint that could not be written; `no_space` when the filesystem is full (or over quota)."""

    def __init__(self, message: str, no_space: bool):
        super().__init__(message)
        self.no_space = no_space


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is incomplete: {path} is missing (a save that did not finish on every rank)"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    for rel, entry in meta.get("files", {}).items():
        f, size = ckpt_dir / rel, integrity.recorded_size(entry)
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {f} has {f.stat().st_size} bytes, {size} were written (truncated or replaced)"
            )
    return meta


def list_tags(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step_* directory under root, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), root / d) for d in os.listdir(root) if (m := _TAG.match(d)) and (root / d).is_dir()]
    return sorted(found)


def newest_complete(root: str | Path, log=print, verify=None) -> Path | None:
    """The newest checkpoint under root that is complete and, when `verify(path, meta)` is given,
    for which it finds no problem (it returns a sentence or None; a collective in the trainer)."""
    for step, path in reversed(list_tags(root)):
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            log(f"skipping checkpoint {path}: {e}")
            continue
        problem = verify(path, meta) if verify else None
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def resolve_resume(run_dir: str | Path, resume: str, log=print, verify=None) -> Path | None:
    """The checkpoint to start from: "auto" → newest complete (and verified) in run_dir (None if there
    is none), "none" → None, else the given checkpoint directory (which must be complete and verify)."""
    root = Path(run_dir) / CKPT_DIR
    if resume == "none":
        return None
    if resume == "auto":
        return newest_complete(root, log, verify)
    path = Path(resume)
    if path.is_dir() and (path / POINTER).is_file():  # a ckpt/ root: follow its pointer
        path = path / (path / POINTER).read_text().strip()
    meta = read_meta(path)
    if verify and (problem := verify(path, meta)):
        raise CheckpointError(problem)
    return path


def checkpoint_bytes(meta: dict) -> int:
    return sum(integrity.recorded_size(e) for e in meta.get("files", {}).values())


def verify_across_ranks(ckpt_dir: str | Path, meta: dict, log=print) -> str | None:
    """Check every recorded checksum of a checkpoint, each rank reading about 1/world of the bytes;
    the problems found on any rank (one sentence each, naming the file), or None. A collective."""
    import torch.distributed as dist

    t0 = time.time()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    files = meta.get("files", {})
    problems = integrity.verify_files(ckpt_dir, files, integrity.assign(files, world)[rank])
    found = [p for mine in (_gather(problems) if world > 1 else [problems]) for p in mine]
    if found:
        return "; ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")
    if not any(isinstance(e, dict) for e in files.values()):
        log(f"checkpoint {ckpt_dir} records no checksums (written by an older version): sizes checked only")
    else:
        log(
            f"verified checkpoint {ckpt_dir}: {len(files)} files, {checkpoint_bytes(meta) / 2**20:.1f} MiB, "
            f"checksums match ({time.time() - t0:.1f} s)"
        )
    return None


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
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
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


def _gather(obj) -> list:
    """Every rank's `obj`, on every rank (small Python objects: outcomes, checksums)."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def check_space(root: Path, path: Path, log=print) -> None:
    """Before writing `path`: every rank sees room for about the previous checkpoint's size on the
    filesystem of `root`, or every rank raises SaveError (no_space) naming the path and the bytes."""
    previous = newest_complete(root, log=lambda *_: None)
    size = checkpoint_bytes(read_meta(previous)) if previous else 0
    need = integrity.space_needed(size)
    free = _gather(integrity.free_bytes(root))
    short = [(r, f) for r, f in enumerate(free) if f < need]
    if short:
        ranks = ", ".join(f"rank {r}: {f}" for r, f in short[:4])
        raise SaveError(
            f"not enough free space to save checkpoint {path}: it needs about {need} bytes (the "
            f"previous checkpoint {previous.name} took {size}, plus "
            f"{integrity.SPACE_MARGIN:.0%}), {min(f for _, f in short)} are free on {root} ({ranks}); "
            f"nothing was written and `latest` still names {previous.name}: free space (or move the "
            f"run dir) and start again to resume",
            no_space=True,
        )


class _Recording:
    """What one rank wrote in a save: each file's record, or the first write that failed."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        self.error: tuple[str, BaseException] | None = None

    def add(self, records: dict[str, dict]) -> None:
        for f, rec in records.items():
            self.records[str(Path(f).relative_to(self.path.resolve()))] = rec

    def write(self, f: Path, writer) -> None:
        if self.error is None:
            try:
                writer(f)
                self.records[str(f.relative_to(self.path))] = integrity.file_record(f)
            except Exception as e:  # noqa: BLE001 (reported on every rank)
                self.error = (str(f), e)


def _deepspeed_save(engine, root: Path, tag: str, rec: _Recording) -> None:
    """engine.save_checkpoint with every file checksummed as written and write errors recorded, not
    raised: a rank that raised inside would leave its peers in DeepSpeed's closing collectives. The
    recovery scripts DeepSpeed copies on rank 0 (a private method) get the same treatment."""
    ds_client = {"universal_checkpoint_info": {}} if engine.zero_optimization_stage() < 3 else {}
    writer = integrity.RecordingCheckpointEngine(engine.checkpoint_engine)
    copy_scripts = engine._copy_recovery_script

    def copy_recorded(save_path):
        try:
            copy_scripts(save_path)
        except OSError as e:
            writer.error = writer.error or (str(save_path), e)

    engine.checkpoint_engine, engine._copy_recovery_script = writer, copy_recorded
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=ds_client, save_latest=False)
    finally:
        engine.checkpoint_engine = writer.inner
        del engine._copy_recovery_script
    rec.add({f: r for f, r in writer.records.items() if Path(f).is_relative_to(rec.path.resolve())})
    rec.error = writer.error


def _fail(path: Path, failures: list[tuple[int, str, bool]], root: Path) -> SaveError:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # give back what the partial save took
    dist.barrier()
    pointer = root / POINTER
    latest = pointer.read_text().strip() if pointer.is_file() else "no checkpoint yet"
    lines = "; ".join(f"rank {r}: {msg}" for r, msg, _ in failures[:4])
    more = f" (and {len(failures) - 4} more ranks)" if len(failures) > 4 else ""
    return SaveError(
        f"checkpoint {path} could not be written ({lines}{more}); the partial checkpoint was "
        f"removed and `latest` still names {latest}",
        no_space=any(ns for _, _, ns in failures),
    )


def save(engine, ema, run_dir: str | Path, step: int, *, client: dict, meta: dict, keep_last: int, log=print) -> Path:
    """Write a complete checkpoint of `step` on every rank, then publish it (meta.json, pointer) and
    rotate. `client` is this rank's state (loader, counters); `meta` rank 0's run description.
    SaveError on every rank when the space is short or any rank's write failed."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / CKPT_DIR
    tag = tag_for(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # an incomplete save of this step from a crashed run
            shutil.rmtree(path)
    check_space(root, path, log)  # (also the barrier after the removal)
    t0 = time.time()
    rec = _Recording(path)
    _deepspeed_save(engine, root, tag, rec)
    own = [path / "ema" / f"rank_{rank:05d}.safetensors", path / "client" / f"rank_{rank:05d}.pt"]
    if rec.error is None:
        for f in own:
            f.parent.mkdir(exist_ok=True)
    rec.write(own[0], ema.save)
    rec.write(own[1], lambda f: torch.save({**client, "rng": rng_state(), "rank": rank, "world_size": world}, f))
    if rec.error is None:
        _fault_point("save", rank, step, path)
        pause_for_test(f"save:{step}")
        try:
            fsync_own_files(path, rank, own)
        except OSError as e:
            rec.error = (str(path), e)
    report = None if rec.error is None else integrity.describe_write_error(*rec.error)
    everyone = _gather((report, rec.records))
    failures = [(r, *rep) for r, (rep, _) in enumerate(everyone) if rep is not None]
    if failures:
        raise _fail(path, failures, root)
    published = None
    if rank == 0:
        try:
            files = {rel: r for _, records in everyone for rel, r in records.items()}
            for p in sorted(path.rglob("*")):  # files no rank recorded (none expected): checksummed here
                if p.is_file() and str(p.relative_to(path)) not in files:
                    files[str(p.relative_to(path))] = integrity.file_record(p)
            meta = {
                **meta,
                "step": step,
                "tag": tag,
                "world_size": world,
                "zero_stage": engine.zero_optimization_stage(),
                "files": dict(sorted(files.items())),
                "checksum": integrity.CHECKSUM,
                "saved_at": time.time(),
            }
            atomic_write(path / META, json.dumps(meta, indent=1, default=str).encode())
            atomic_write(root / POINTER, tag.encode())
        except Exception as e:  # noqa: BLE001
            published = integrity.describe_write_error(path / META, e)
    published = _gather(published)[0]
    if published is not None:
        raise _fail(path, [(0, *published)], root)
    if rank == 0:
        rotate(root, keep_last, log)
    log(f"saved checkpoint {path} ({time.time() - t0:.1f} s)")
    return path


def needs_universal(meta: dict, world_size: int, zero_stage: int) -> bool:
    """Whether DeepSpeed must load `meta`'s checkpoint through its universal form. Never between stage-0
    checkpoints: each holds the whole fp32 model and optimizer state, which any world size loads as is."""
    if meta["zero_stage"] == 0 and zero_stage == 0:
        return False
    return meta["world_size"] != world_size or meta["zero_stage"] != zero_stage


def stage_change_problem(meta: dict, zero_stage: int) -> str | None:
    """Why a checkpoint of `meta`'s ZeRO stage cannot be resumed under `zero_stage`, or None. DeepSpeed
    converts between ZeRO-1 and 2 (universal form) but not to or from ZeRO-3, and a stage-0 checkpoint
    (no ZeRO files) has no universal form at all."""
    saved = meta["zero_stage"]
    if saved == zero_stage or {saved, zero_stage} <= {1, 2}:
        return None
    if 0 in (saved, zero_stage):
        return (
            f"was written under zero_optimization.stage {saved}, this run's is {zero_stage}: a stage-0 "
            f"checkpoint (plain data parallel) has no universal form, and DeepSpeed cannot load a ZeRO one "
            f"without ZeRO; keep zero_optimization.stage (the world size may change), or start a new run_dir"
        )
    return (
        f"was written under ZeRO-{saved}, this run uses ZeRO-{zero_stage}; DeepSpeed cannot move a checkpoint "
        f"between ZeRO-3 and ZeRO-1/2: keep the stage (the world size may change)"
    )


def make_universal(ckpt_dir: str | Path, run_dir: str | Path, log=print) -> Path:
    """DeepSpeed's universal form of a checkpoint, so another world size or ZeRO stage can load it:
    converted once by rank 0 into RUN_DIR/ckpt/universal/<tag> (the source may be another run's, and
    read-only). Returns the directory to load from (its parent is the load_dir, its name the tag)."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    if read_meta(ckpt_dir)["zero_stage"] == 0:
        raise CheckpointError(
            f"{ckpt_dir} was written under zero_optimization.stage 0: DeepSpeed's universal conversion needs "
            f"ZeRO files; a stage-0 checkpoint loads as it is on any world size"
        )
    out = Path(run_dir) / CKPT_DIR / "universal" / ckpt_dir.name
    done = out / ".complete"
    error = None
    if dist.get_rank() == 0 and not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"converting {ckpt_dir} to a universal checkpoint in {out}")
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt_dir),
            "--output_folder",
            str(out),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
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
    world size: rank 0's loader state, RNG states only where the rank existed."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    rank, same_world = dist.get_rank(), meta["world_size"] == dist.get_world_size()
    load_from = universal_dir or ckpt_dir
    try:
        got, _ = engine.load_checkpoint(
            str(load_from.parent), tag=load_from.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise CheckpointError(
            f"cannot load the DeepSpeed state of {load_from}: {e!r} (at {where.filename}:{where.lineno}: {where.line})"
        ) from e
    if got is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {load_from}")
    zero_partition_padding(engine)  # checkpoints written before it was zeroed
    same_rank = ckpt_dir / "client" / f"rank_{rank:05d}.pt"
    source = same_rank if same_world or same_rank.exists() else ckpt_dir / "client" / "rank_00000.pt"
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
        raise CheckpointError(
            f"{ckpt_dir / 'ema'} holds {len(files)} EMA files, the checkpoint was written by {meta['world_size']} ranks"
        )
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


#################################################################################
#                         By hand: python -m ... verify                         #
#################################################################################


def _verify_here(ckpt_dir: Path, meta: dict) -> str | None:
    files = meta.get("files", {})
    problems = integrity.verify_files(ckpt_dir, files, list(files))
    return "; ".join(problems) or None


def verify_run(target: str | Path, out=print) -> int:
    """Check the checkpoints of a run dir (or its ckpt/ dir, or one checkpoint) in this process: complete,
    sizes, checksums. 0 when every complete checkpoint is intact, 1 when one is not, 2 when none is found."""
    target = Path(target)
    if (target / META).exists() or _TAG.match(target.name):
        found = [target]
    else:
        root = target / CKPT_DIR if (target / CKPT_DIR).is_dir() else target
        found = [p for _, p in list_tags(root)]
    if not found:
        out(f"error: no checkpoints (step_* directories) under {target}")
        return 2
    bad = 0
    for path in found:
        t0 = time.time()
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            bad += (path / META).exists()
            out(f"{path}: {'BAD' if (path / META).exists() else 'incomplete'}: {e}")
            continue
        problem = _verify_here(path, meta)
        bad += problem is not None
        checked = "checksums match" if meta.get("checksum") else "no checksums recorded (older version): sizes match"
        out(
            f"{path}: BAD: {problem}"
            if problem
            else f"{path}: ok: step {meta['step']}, {len(meta.get('files', {}))} files, "
            f"{checkpoint_bytes(meta) / 2**20:.1f} MiB, {checked} ({time.time() - t0:.1f} s)"
        )
    if len(found) > 1:
        usable = newest_complete(found[0].parent, log=lambda *_: None, verify=_verify_here)
        out(f"resume auto would start from: {usable or 'nothing (no intact checkpoint)'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m ditscale.engine.checkpoint", description="Inspect a run's checkpoints by hand."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify",
        help="check every checkpoint: complete, sizes and checksums of all files "
        "(exit 0 intact, 1 a checkpoint is damaged, 2 none found)",
    )
    v.add_argument("path", help="RUN_DIR, RUN_DIR/ckpt, or one RUN_DIR/ckpt/step_* directory")
    args = ap.parse_args(argv)
    return verify_run(args.path)


if __name__ == "__main__":
    sys.exit(main())
