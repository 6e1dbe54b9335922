"""What makes a checkpoint trustworthy: a checksum of every file, free space before a save, and a save
error that says what happened.

- Checksums: xxh3-64 over each file's bytes, computed by the rank that wrote the file right after
  writing it (DeepSpeed's files through `RecordingCheckpointEngine`), recorded in meta.json and checked
  before a resume uses the checkpoint (`verify_files`, split over the ranks). A flipped byte that leaves
  the size alone is caught here; torch.load and safetensors would accept it.
- Free space: a save needs about as many bytes as the previous checkpoint (`space_needed`); the trainer
  checks before it starts writing, on every rank, rather than failing half-way.
- Errors: `describe_write_error` turns what a failed write raised (an OSError, or the RuntimeError torch's
  zip writer makes of one) into a sentence naming the path, and tells "no space" (ENOSPC, EDQUOT) apart.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import xxhash

CHECKSUM = "xxh3_64"
_CHUNK = 8 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def file_checksum(path: str | Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """{"bytes", CHECKSUM} of a file as it is now on disk."""
    return {"bytes": os.path.getsize(path), CHECKSUM: file_checksum(path)}


#################################################################################
#                              Recording DeepSpeed's writes                     #
#################################################################################


class RecordingCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine for one save: every file it writes is checksummed right after
    writing, and a write that fails is recorded instead of raised, so this rank still takes part in the
    collectives that follow inside `engine.save_checkpoint` (a rank that raised there would leave its
    peers waiting in a barrier). The caller reads `records` and `error` afterwards."""

    def __init__(self, inner):
        self.inner = inner
        self.records: dict[str, dict] = {}  # absolute path -> file_record
        self.error: tuple[str, BaseException] | None = None

    def save(self, state_dict, path: str):
        if self.error is not None:
            return
        try:
            self.inner.save(state_dict, path)
            self.records[str(Path(path).resolve())] = file_record(path)
        except Exception as e:  # noqa: BLE001 (reported by the caller, on every rank)
            self.error = (str(path), e)

    def __getattr__(self, name):
        return getattr(self.inner, name)


#################################################################################
#                                  Verification                                 #
#################################################################################


def recorded_size(entry) -> int:
    """A meta.json file entry: {"bytes", "xxh3_64"}, or the bare size older checkpoints recorded."""
    return entry if isinstance(entry, int) else entry["bytes"]


def assign(files: dict[str, object], world: int) -> list[list[str]]:
    """Files split over `world` readers with about equal bytes each (largest first, to the lightest)."""
    parts: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for rel in sorted(files, key=lambda r: (-recorded_size(files[r]), r)):
        i = load.index(min(load))
        parts[i].append(rel)
        load[i] += recorded_size(files[rel])
    return parts


def verify_files(ckpt_dir: str | Path, files: dict[str, object], names: list[str]) -> list[str]:
    """Problems (one sentence each, naming the file) among `names` of a checkpoint's recorded files."""
    ckpt_dir = Path(ckpt_dir)
    problems = []
    for rel in names:
        entry, path = files[rel], ckpt_dir / rel
        if isinstance(entry, int) or CHECKSUM not in entry:
            continue
        try:
            got = file_checksum(path)
        except OSError as e:
            problems.append(f"cannot read checkpoint file {path}: {e.strerror or e}")
            continue
        if got != entry[CHECKSUM]:
            problems.append(
                f"checkpoint file {path} is corrupt: its {CHECKSUM} is {got}, {entry[CHECKSUM]} "
                f"was recorded when it was written"
            )
    return problems


#################################################################################
#                            Free space and write errors                        #
#################################################################################

SPACE_MARGIN = 0.05  # checkpoints grow a little (loader state, metadata) and the FS rounds up
SPACE_SLACK = 1 << 20


def space_needed(previous_bytes: int) -> int:
    return int(previous_bytes * (1 + SPACE_MARGIN)) + SPACE_SLACK if previous_bytes else 0


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _os_error(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _probe(directory: Path) -> OSError | None:
    """Try to write and flush 1 MiB where the failed file was: the errno a full disk or quota gives."""
    probe = directory / f".space_probe_{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * SPACE_SLACK)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def describe_write_error(path: str | Path, e: BaseException) -> tuple[str, bool]:
    """(a sentence naming `path` and what failed, whether it is a lack of space). torch.save's zip writer
    reports a full disk as "RuntimeError: ... unexpected pos"; a probe write next to the file then gives
    the operating system's own answer."""
    path = Path(path)
    os_err = _os_error(e)
    if os_err is None and path.parent.is_dir():
        probed = _probe(path.parent)
        if probed is not None and probed.errno in NO_SPACE:
            os_err = probed
    if os_err is not None:
        no_space = os_err.errno in NO_SPACE
        what = os.strerror(os_err.errno).lower() if os_err.errno else str(os_err)
        return (
            f"writing {path} failed: {what} (OSError errno {errno.errorcode.get(os_err.errno, os_err.errno)}); "
            f"{free_bytes(path)} bytes free on its filesystem",
            no_space,
        )
    return f"writing {path} failed: {type(e).__name__}: {e}", False
