"""The local cluster itself: a 2-node job gets one task per node and a gloo all-reduce spans both."""

import re
import sys
import time

ALLREDUCE_JOB = f"""#!/bin/bash
set -euo pipefail
source "$SLURM_SUBMIT_DIR/slurm/common.sh"
rendezvous_env
srun {sys.executable} tests/slurm/allreduce_task.py
"""


def test_two_node_allreduce(slurm_cluster, tmp_path):
    script = tmp_path / "allreduce.sh"
    script.write_text(ALLREDUCE_JOB)
    out = tmp_path / "allreduce.out"
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={out}", str(script))
    job = slurm_cluster.wait(job_id, timeout=120)
    log = out.read_text()
    assert job.state == "COMPLETED", log
    lines = sorted(re.findall(r"rank=(\d) world=2 node=(\w+) sum=(\S+)", log))
    assert lines == [("0", "node1", "3"), ("1", "node2", "3")], log


def test_job_signals_reach_every_task(slurm_cluster, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@...` does) reaches both tasks via run_srun."""
    script = tmp_path / "signal.sh"
    script.write_text(
        "#!/bin/bash\n"
        'source "$SLURM_SUBMIT_DIR/slurm/common.sh"\n'
        'run_srun bash -c \'trap "echo task $SLURM_PROCID stopping; exit 85" USR1; '
        "echo task $SLURM_PROCID ready; while :; do sleep 0.1; done'\n"
        'echo "srun exit $SRUN_RC"\n'
    )
    out = tmp_path / "signal.out"
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={out}", str(script))
    slurm_cluster.wait(job_id, timeout=60, until={"RUNNING"})
    for _ in range(200):
        if out.exists() and out.read_text().count("ready") == 2:
            break
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=60)
    log = out.read_text()
    assert job.state == "COMPLETED", log
    assert "task 0 stopping" in log and "task 1 stopping" in log and "srun exit 85" in log, log
