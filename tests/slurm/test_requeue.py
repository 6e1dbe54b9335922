"""slurm/common.sh's `requeue_and_exit`, how every batch script requeues itself (train_xl.sh, sample.sh,
prep_latents.sh's encode tasks): after `scontrol requeue` it reports what SLURM made of the job and exits, for
a plain job and for an array task (requeued by its own id), on the local cluster."""

from __future__ import annotations

import pytest

PROBE = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
source "$SLURM_SUBMIT_DIR/slurm/common.sh"
SCRIPT_NAME=probe
id=$SLURM_JOB_ID
[[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
if (( ${SLURM_RESTART_COUNT:-0} == 0 )); then
  say "first start of $id"
  requeue_and_exit 7 "goes on where it stopped" "$id"
fi
say "start ${SLURM_RESTART_COUNT} of $id: done"
"""


@pytest.mark.parametrize("array", [False, True], ids=["job", "array task"])
def test_a_script_that_requeues_itself_says_what_slurm_made_of_it(slurm_cluster, tmp_path, array):
    script = tmp_path / "probe.sh"
    script.write_text(PROBE)
    out = tmp_path / "probe-%j.out"
    args = [f"--partition={slurm_cluster.partition}", "--nodes=1", "--ntasks=1", "--time=5", f"--output={out}"]
    job_id = slurm_cluster.sbatch(*args, *(["--array=3"] if array else []), str(script))
    task = f"{job_id}_3" if array else job_id
    job = slurm_cluster.wait(task, timeout=400)
    outputs = list(tmp_path.glob("probe-*.out"))
    text = "".join(p.read_text() for p in outputs)
    assert job.state == "COMPLETED" and job.restarts == 1, (job.fields, text)
    assert len(outputs) == 1, outputs  # --open-mode=append: both starts in one file
    assert f"SLURM: job {task} is requeued (Restarts=1; this allocation is " in text, text
    assert "it starts again when nodes are free and goes on where it stopped" in text, text
    assert f"start 1 of {task}: done" in text and "probe: error" not in text, text
    assert text.index(f"first start of {task}") < text.index("is requeued") < text.index("start 1 of"), text
