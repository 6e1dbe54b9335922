"""Streaming shared memory of a killed job is released on the next start; a live job's is left alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditscale.data.shm import SHM_ROOT, release_stale_loader_shm

REPO = Path(__file__).resolve().parents[2]

READER = """
import sys, time
from ditscale.data import build_dataset
ds = build_dataset(sys.argv[1], batch_size=2, local=sys.argv[2], shuffle=False)
next(iter(ds))
print(ds._shm_prefix_int, flush=True)
time.sleep(600)
"""


def start_reader(root: str, cache: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """A process reading the dataset through `cache`, with its own TMPDIR (streaming's file locks)."""
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, root, str(cache)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"reader did not start (exit {proc.poll()})"
    return proc, f"{int(line):06d}"


def segments(prefix: str) -> set[str]:
    return {p.name for p in SHM_ROOT.glob(f"{prefix}_*")}


@pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm")
def test_a_killed_readers_shm_is_released_and_its_cache_dir_works_again(tmp_path):
    from data_prep.testing import write_synthetic_latents
    from ditscale.data import build_dataset

    root = write_synthetic_latents(str(tmp_path / "data"), 8, latent_size=4, num_classes=2)
    live, live_prefix = start_reader(root, tmp_path / "cache_live", tmp_path / "tmp_live")
    dead, dead_prefix = start_reader(root, tmp_path / "cache_dead", tmp_path / "tmp_dead")
    try:
        os.killpg(dead.pid, signal.SIGKILL)  # the whole job, resource tracker included: nothing cleans up
        dead.wait()
        shutil.rmtree(tmp_path / "tmp_dead")  # SLURM removes a job's TMPDIR; /dev/shm stays
        dead_names = segments(dead_prefix)
        assert f"{dead_prefix}_locals" in dead_names and f"{live_prefix}_locals" in segments(live_prefix)
        # (streaming refuses this cache dir while the dead segments precede the first free prefix:
        # "Reused local directory", issue 21; on a shared test box the prefixes in use vary)
        removed = release_stale_loader_shm()
        assert dead_names <= set(removed) and not segments(dead_prefix)
        assert not set(removed) & segments(live_prefix) and f"{live_prefix}_locals" in segments(live_prefix)
        assert live.poll() is None

        again = build_dataset(root, batch_size=2, local=str(tmp_path / "cache_dead"), shuffle=False)
        assert int(next(iter(again))["index"]) == 0
    finally:
        os.killpg(live.pid, signal.SIGKILL)
        live.wait()
    last = release_stale_loader_shm()  # now dead: released too
    assert live_prefix in {n.split("_")[0] for n in last}, (live_prefix, last, sorted(os.listdir(SHM_ROOT)))


@pytest.mark.skipif(
    not SHM_ROOT.is_dir() or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs /dev/shm, root and unshare (a mount namespace with its own /dev/shm)",
)
def test_a_segment_of_the_same_name_in_another_mount_namespace_does_not_hold_ours():
    """A container or a node of slurm/local_cluster.sh has its own /dev/shm: a live process there holding
    "/dev/shm/999999_locals" says nothing about the dead segment of that name in ours."""
    name = "999999_locals"
    holder = (
        f"mount -t tmpfs tmpfs /dev/shm && : >/dev/shm/{name} && exec {sys.executable} -c "
        f"\"f = open('/dev/shm/{name}'); print('ready', flush=True); import time; time.sleep(600)\""
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", holder], stdout=subprocess.PIPE, text=True
    )
    ours = SHM_ROOT / name
    try:
        assert proc.stdout.readline().strip() == "ready", f"holder did not start (exit {proc.poll()})"
        ours.write_bytes(b"left by a killed loader")
        assert name in release_stale_loader_shm() and not ours.exists()
    finally:
        proc.kill()
        proc.wait()
        ours.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Registering a prefix: jobs that start on one node at the same moment
# ----------------------------------------------------------------------------------------------------------

REGISTER = """
import json, os, sys, time
from streaming.base.shared import prefix as sp
from streaming.base.world import World
from ditscale.data import shm

def slowly(find):  # widen the window between finding a free number and taking it
    def slow(*args, **kwargs):
        found = find(*args, **kwargs)
        time.sleep(0.01)
        return found
    return slow
sp._check_and_find_retrying = slowly(sp._check_and_find_retrying)
shm._free_prefix = slowly(shm._free_prefix)
register = shm.register_prefix if sys.argv[1] == "ours" else sp.get_shm_prefix
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
held, got = [], []
for i in range(6):
    try:
        prefix, mem = register([f"/no/such/dir/{os.getpid()}/{i}"], [None], World.detect())
    except Exception as e:
        got.append(type(e).__name__)
        break
    held.append(mem)
    got.append(prefix)
print(json.dumps(got), flush=True)
open(sys.argv[2] + f".done-{os.getpid()}", "w").close()  # numbers are held until every process is done
while len([f for f in os.listdir(os.path.dirname(sys.argv[2])) if ".done-" in f]) < int(sys.argv[3]):
    time.sleep(0.01)
for mem in held:
    mem.cleanup()
"""


def _register_at_once(which: str, tmp_path: Path, processes: int = 4) -> list:
    (tmp_path / which).mkdir()
    go = tmp_path / which / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER, which, str(go), str(processes)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(processes)
    ]
    time.sleep(5)  # every process imported streaming and waits for the start
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [x for out in outs for x in json.loads(out.strip().splitlines()[-1])]


@pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm")
def test_jobs_starting_on_one_node_at_once_get_distinct_prefixes(tmp_path):
    """4 processes register 6 prefixes each at the same moment. streaming's own registration (find the first
    free number, then create it) hands one number to two of them, and the later create fails: the trainer's
    FileExistsError '/00000N_locals' when two jobs start on a node together. `register_prefix` (find and
    create under the node lock) gives all 24 distinct numbers."""
    theirs = _register_at_once("streaming", tmp_path)
    assert "FileExistsError" in theirs, theirs
    ours = _register_at_once("ours", tmp_path)
    assert len(ours) == 24 and all(isinstance(p, int) for p in ours) and len(set(ours)) == 24, ours
