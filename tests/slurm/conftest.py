"""A real local SLURM cluster (slurm/local_cluster.sh, 2 nodes on this machine) for the slurm tests.

The session fixture starts the cluster in its own state directory and port range, so it does not touch a
cluster a user started with the defaults, and stops it at the end. Tests are skipped with the reason when
SLURM is not installed or we are not root (slurmd runs jobs as root here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
STEPS = 120  # tiny-model training length: long enough to be signalled mid-run, seconds of CPU
CKPT_EVERY = 50
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@dataclass
class Job:
    """The final record of a job (`scontrol show job -o` fields) and its output."""

    job_id: str
    fields: dict[str, str]

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "?")

    @property
    def exit_code(self) -> int:
        return int(self.fields.get("ExitCode", "0:0").split(":")[0])

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", "0"))


class Cluster:
    """Thin wrappers around sbatch / scontrol / scancel for one local cluster, and train_xl.sh jobs."""

    steps = STEPS

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.partition = env.get("DITSCALE_SLURM_PARTITION", "debug")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, text=True, capture_output=True, check=check)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, umask: int | None = None) -> str:
        """Submit; returns the job id. `env` is added to the cluster's environment (sbatch exports it);
        `umask` is the submitter's (the job runs with it)."""
        full_env = {**self.env, **(env or {})}
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            env=full_env,
            cwd=cwd,
            text=True,
            capture_output=True,
            preexec_fn=None if umask is None else (lambda: os.umask(umask)),
        )
        assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def show(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: str, timeout: float, until: set[str] = TERMINAL) -> Job:
        """Poll until the job reaches a state in `until` (a requeued job passes through PENDING)."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.show(job_id) or fields
            if fields.get("JobState") in until:
                return Job(job_id, fields)
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not in {sorted(until)} after {timeout:.0f} s: {fields}")

    def train(
        self,
        run_dir: Path,
        data: Path,
        *,
        nodes: int,
        tasks_per_node: int,
        env=None,
        overrides=(f"train.max_steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}"),
        sbatch_args=("--time=30",),
        umask: int | None = None,
    ) -> tuple[str, Path]:
        """sbatch slurm/train_xl.sh with the tiny config on CPU; returns (job id, the job's output file)."""
        out = run_dir.parent / f"{run_dir.name}-%j.out"
        out.parent.mkdir(parents=True, exist_ok=True)  # SLURM creates the output file, not its folder
        job_env = {
            "CONFIG": "configs/tiny_test.yaml",
            "DATA": str(data),
            "RUN_DIR": str(run_dir),
            "GPUS_PER_NODE": "0",
            "EXTRA": " ".join(overrides),
            **(env or {}),
        }
        job_id = self.sbatch(
            f"--partition={self.partition}",
            "--gres=none",
            f"--nodes={nodes}",
            f"--ntasks-per-node={tasks_per_node}",
            "--cpus-per-task=1",
            *sbatch_args,
            f"--output={out}",
            "slurm/train_xl.sh",
            env=job_env,
            umask=umask,
        )
        return job_id, Path(str(out).replace("%j", job_id))

    def node_root(self, node: str) -> Path:
        """The file system as the node's jobs see it (its slurmd's mount namespace: its own /dev/shm)."""
        pid = (Path(self.env["DITSCALE_SLURM_DIR"]) / "run" / f"slurmd-{node}.pid").read_text().strip()
        return Path(f"/proc/{pid}/root")

    @staticmethod
    def logs(run_dir: Path, out: Path, job_id: str) -> str:
        """A train_xl.sh job's output file and its log in the run dir, for assertions and failure messages."""
        text = out.read_text() if out.exists() else f"(no {out})\n"
        log = run_dir / "logs" / f"slurm-{job_id}.log"
        return text + "\n--- " + str(log) + "\n" + (log.read_text() if log.exists() else "(none)")


def _require_slurm() -> None:
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs as root (SlurmUser=root); run the slurm tests as root")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    """A 2-node cluster (node1, node2) on localhost; the SLURM_CONF for it is in `cluster.env`."""
    _require_slurm()
    state = os.environ.get("DITSCALE_SLURM_TEST_DIR", "/tmp/ditscale-slurm-pytest")
    port = os.environ.get("DITSCALE_SLURM_TEST_PORT", "6917")  # apart from a default cluster (6817)
    env = {**os.environ, "DITSCALE_SLURM_DIR": state, "DITSCALE_SLURM_PORT": port}
    # 8 CPUs a node (on any machine): test_signals.py runs up to 7 one-CPU tasks at once, mostly waiting
    start = subprocess.run(
        [str(LOCAL_CLUSTER), "start", "--nodes", "2", "--cpus", "8"], env=env, text=True, capture_output=True
    )
    if start.returncode != 0:
        subprocess.run([str(LOCAL_CLUSTER), "stop"], env=env, capture_output=True)
        pytest.fail(f"local_cluster.sh start failed:\n{start.stderr}")
    (line,) = [ln for ln in start.stdout.splitlines() if ln.startswith("export SLURM_CONF=")]
    env["SLURM_CONF"] = line.split("=", 1)[1]
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    try:
        yield Cluster(env)
    finally:
        stop = subprocess.run([str(LOCAL_CLUSTER), "stop"], env=env, text=True, capture_output=True)
        if stop.returncode != 0:
            print(f"local_cluster.sh stop failed:\n{stop.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """18 scikit-image crops in pixel mode at 8x8, as MDS in 2 slices (data_prep's Python API)."""
    from data_prep import make_dataset
    from data_prep.testing import write_image_folder

    base = tmp_path_factory.mktemp("slurm-data")
    images = write_image_folder(str(base / "images"), classes=3, per_class=6, min_side=16, max_side=24)
    return Path(make_dataset(images, str(base / "ds"), format="mds", resolution=8, num_slices=2, decode_workers=0))


@pytest.fixture(scope="session")
def two_node_run(slurm_cluster, tiny_dataset, tmp_path_factory):
    """One uninterrupted train_xl.sh run on 2 nodes x 1 task: (job, run dir, text of its logs)."""
    run_dir = tmp_path_factory.mktemp("two-node") / "run"
    job_id, out = slurm_cluster.train(run_dir, tiny_dataset, nodes=2, tasks_per_node=1)
    job = slurm_cluster.wait(job_id, timeout=600)
    return job, run_dir, slurm_cluster.logs(run_dir, out, job_id)
