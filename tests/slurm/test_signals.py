"""Stop signals at every moment of a train_xl.sh job, SLURM's own requeue, a real --time limit, a hung rank,
non-finite steps: slurm/train_xl.sh's decision table replayed on the local cluster (its other rows are in
test_train_xl.py: a crash at start, bad input, scancel).

The moments are made by construction: DITSCALE_TEST_PAUSE (ditscale/engine/signals.py) holds the trainer
(or the script's pre-flight check, the same program) at a named point of a named allocation until a stop
signal arrives, and each rank prints a line there, so the test (or SLURM's time limit) signals exactly
then. The module's jobs share the cluster: the unattended ones run while the first two tests drive theirs;
the last test checks every node's /dev/shm once all of them have ended.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from test_train_xl import events, final_weights

from ditscale.data.shm import _segments

HANG_MIN = 0.5  # the hung-rank job's train.hang_timeout_min: well above a step's worst stall on 2 loaded cores
SRUN_WAIT_S = 60  # train_xl.sh's srun --wait


def wait_until(predicate, what: str, cluster, job_id: str, logs, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        state = cluster.show(job_id).get("JobState")
        assert state in (None, "PENDING", "RUNNING", "COMPLETING", "REQUEUED"), f"{what}: job is {state}\n{logs()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s\n{logs()}"
        time.sleep(0.05)


def end_within(cluster, job_id: str, minutes: int) -> None:
    """Lower a running job's time limit (whole minutes) so that it ends within `minutes` from now."""
    h, m, sec = map(int, re.split("[-:]", cluster.show(job_id)["RunTime"])[-3:])
    elapsed = 3600 * h + 60 * m + sec
    cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={elapsed // 60 + minutes}")


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("signals")


@pytest.fixture(scope="module")
def unattended_jobs(slurm_cluster, tiny_dataset, jobs_dir):
    """Submitted first, they end while the test of every moment runs (run dir, job id, output):
    - "time limit": 1 task held after its final checkpoint until the --signal=B:USR1@60 of its time limit;
    - "hang": 2 nodes x 1 task, rank 1 stops itself (SIGSTOP) at step 60, after the step-50 checkpoint;
    - "past its time": 1 task held after step 5 until its time limit, lowered to end within a minute, ends it;
    - "non-finite": 1 task, the trainer exits 3 after the pre-flight check passed."""
    cluster, jobs = slurm_cluster, {}

    def submit(name, data=tiny_dataset, **kw):
        run_dir = jobs_dir / name.replace(" ", "-") / "run"
        jobs[name] = (run_dir, *cluster.train(run_dir, data, **kw))

    submit(
        "time limit",
        nodes=1,
        tasks_per_node=1,
        sbatch_args=("--time=30", "--signal=B:USR1@60"),
        overrides=("train.max_steps=4", "train.ckpt_every=4"),
        env={"DITSCALE_TEST_PAUSE": "0:done", "SIGNAL_MARGIN": "60"},
    )
    submit(
        "hang",
        nodes=2,
        tasks_per_node=1,
        overrides=(f"train.max_steps={cluster.steps}", "train.ckpt_every=50", f"train.hang_timeout_min={HANG_MIN}"),
        env={"DITSCALE_TEST_PAUSE": "0:step:60:hang:1"},
    )
    submit(
        "past its time",
        nodes=1,
        tasks_per_node=1,
        # starts 30 s after the others (added when streaming's shared-memory prefix race could kill one of
        # two trainers starting on a node at once; ditscale.data.shm.register_prefix now prevents it).
        # Its warning signal is one nobody acts on (URG), replacing the script's USR1@600: with the limit
        # lowered below 600 s, SLURM's USR1 could come before the limit and stop the job (requeued) first
        sbatch_args=("--time=30", "--begin=now+30", "--signal=B:URG@600"),
        overrides=("train.max_steps=100000", "train.ckpt_every=100000"),
        env={"DITSCALE_TEST_PAUSE": "0:step:5"},
    )
    submit(
        "non-finite",
        nodes=1,
        tasks_per_node=1,
        overrides=("train.max_steps=20", "optim.lr=1e30", "train.max_nonfinite=3"),
    )
    return jobs


# ----------------------------------------------------------------------------------------------------------
# A real time limit: its warning signal after the final checkpoint
# ----------------------------------------------------------------------------------------------------------


def test_time_limit_signal_after_the_final_checkpoint_finishes_the_job(slurm_cluster, unattended_jobs):
    """The trainer is held after "done" until a stop signal; then the job's time limit is lowered to end 1-2
    minutes later, so that SLURM's own warning of it (--signal=B:USR1@60) comes while the trainer is held:
    the limit is crossed by construction. The signal changes nothing: exit 0, no requeue."""
    cluster = slurm_cluster
    run_dir, job_id, out = unattended_jobs["time limit"]

    def logs() -> str:
        return cluster.logs(run_dir, out, job_id)

    wait_until(
        lambda: "test pause at done: waiting" in logs(), "pause after the final checkpoint", cluster, job_id, logs
    )
    end_within(cluster, job_id, minutes=2)  # 61..120 s left
    job = cluster.wait(job_id, timeout=300)
    text = logs()
    assert job.state == "COMPLETED" and job.exit_code == 0 and job.restarts == 0, (job.fields, text)
    assert text.index("test pause at done: waiting") < text.index("got SIGUSR1: forwarding to every task"), text
    assert "got SIGUSR1 after the final checkpoint: the run is finished, exit 0" in text, text
    assert "run finished (the stop signal came after the final checkpoint)" in text, text
    left = int(re.search(r"the stop signal came (-?\d+) s before the job's time limit", text).group(1))
    assert 0 < left <= 120, text  # --signal=B:USR1@60, which SLURM may send up to 60 s early (sbatch(1))
    assert events(run_dir)[-1]["event"] == "done"


def test_past_its_time_limit_saves_and_is_left_for_sbatch(slurm_cluster, unattended_jobs):
    """The time limit itself ends the job: the trainer is held after step 5, and the job's limit is lowered
    to end within a minute (its warning signal is URG, which nothing acts on). The trainer saves on the
    limit's SIGTERM and exits 85; SLURM is already ending the job (it never requeues one past its time
    limit), so the script does not requeue it and asks for an sbatch, to resume."""
    cluster = slurm_cluster
    run_dir, job_id, out = unattended_jobs["past its time"]

    def logs() -> str:
        return cluster.logs(run_dir, out, job_id)

    wait_until(lambda: "test pause at step:5: waiting" in logs(), "pause after step 5", cluster, job_id, logs)
    end_within(cluster, job_id, minutes=1)  # 1..60 s left
    job = cluster.wait(job_id, timeout=300)
    text = logs()
    assert job.state == "TIMEOUT" and job.restarts == 0, (job.fields, text)
    assert f"JOB {job_id} ON node1 CANCELLED AT" in text and "DUE TO TIME LIMIT" in text, text
    assert "test pause at step:5: SIGTERM, going on" in text and "got SIGUSR1" not in text, text
    assert "rank 0: stop agreed at step 5" in text and "trainer exited with 85" in text, text
    assert re.search(r"decision: exit 85, stop signal 1, new checkpoint 1, SLURM: ended:\w+ -> leave", text), text
    assert (
        "preempted after a complete checkpoint, but the job is" in text
        and "SLURM will not requeue it: not requeued; sbatch again to resume from the newest checkpoint" in text
        and "requeueing" not in text
    ), text
    assert [e["step"] for e in events(run_dir) if e["event"] == "checkpoint"] == [5], events(run_dir)


# ----------------------------------------------------------------------------------------------------------
# Every moment of one job: before the trainer, in its start-up, in a periodic save, SLURM's own requeue
# ----------------------------------------------------------------------------------------------------------


PYTHON_WRAPPER = """#!/bin/sh
# the trainer's interpreter, except in allocation 4: there a process that dies of a stop signal (the
# default action) in its start-up, as Python does before the trainer's first line
if [ "$SLURM_RESTART_COUNT" = 4 ]; then echo "python wrapper: waiting"; exec sleep 600; fi
exec {python} "$@"
"""


def test_stop_signal_at_every_moment_requeues_without_loss(
    slurm_cluster, tiny_dataset, jobs_dir, unattended_jobs, two_node_run
):
    """One job, six allocations (restart 0..5), each stopped at another moment; the run ends with the
    weights of an uninterrupted run, no crash counted, and every file created with the submitter's umask."""
    import sys

    cluster, run_dir = slurm_cluster, jobs_dir / "moments" / "run"
    python = jobs_dir / "moments" / "python"
    python.parent.mkdir()
    python.write_text(PYTHON_WRAPPER.format(python=sys.executable))
    python.chmod(0o755)
    job_id, out = cluster.train(
        run_dir,
        tiny_dataset,
        nodes=2,
        tasks_per_node=1,
        umask=0o027,
        env={
            "DITSCALE_TEST_PAUSE": "0:start,1:start,2:save:50,3:loop",
            "SIGNAL_MARGIN": "10",
            "PYTHON": str(python),
        },
    )
    check_log = run_dir / "logs" / f"check-{job_id}.log"

    def logs() -> str:
        return cluster.logs(run_dir, out, job_id)

    def paused(point: str) -> bool:
        return logs().count(f"test pause at {point}: waiting for a stop signal") == 2

    def usr1_to_batch_shell() -> None:  # what --signal=B:USR1@N does
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # 0: the script's pre-flight check (the trainer's --check) held at its first line, before srun; the
    # signal reaches the shell and its child: the check passes, the trainer is not started
    wait_until(
        lambda: check_log.exists() and "waiting for a stop signal" in check_log.read_text(),
        "pre-flight check",
        cluster,
        job_id,
        logs,
    )
    cluster.run("scancel", "--signal=USR1", "--full", job_id)
    # 1: at the trainer's first line (both ranks): start-up goes on, then exit 85 before the first step
    wait_until(lambda: paused("start"), "pause at start", cluster, job_id, logs)
    usr1_to_batch_shell()
    # 2: inside the periodic save of step 50 (its files written, not yet published)
    wait_until(lambda: paused("save:50"), "pause in the save of step 50", cluster, job_id, logs)
    usr1_to_batch_shell()
    # 3: SLURM requeues the job itself (as after a node failure) while the trainer starts
    wait_until(lambda: paused("loop"), "pause before the first step", cluster, job_id, logs)
    cluster.run("scontrol", "requeue", job_id)
    # 4: the stop signal kills the trainer's processes (they have not reached its first line)
    wait_until(lambda: logs().count("python wrapper: waiting") == 2, "python wrapper", cluster, job_id, logs)
    usr1_to_batch_shell()
    job = cluster.wait(job_id, timeout=600)
    text = logs()

    assert job.state == "COMPLETED" and job.exit_code == 0 and job.restarts == 5, (job.fields, text)
    assert "test pause at start: SIGUSR1, going on" in check_log.read_text()
    decisions = re.findall(r"decision: exit (\S+), stop signal (\d), new checkpoint (\d), SLURM: (\S+) -> (\w+)", text)
    assert decisions == [
        ("none", "1", "0", "running", "requeue"),
        ("85", "1", "0", "running", "requeue"),
        ("85", "1", "1", "running", "requeue"),
        ("85", "1", "0", "requeued", "leave"),
        ("138", "1", "0", "running", "requeue"),  # 128 + SIGUSR1
        ("0", "0", "1", "running", "finish"),
    ], text
    assert "the trainer ended with exit 138 after a stop signal (not a crash; the newest checkpoint stands)" in text
    log = (run_dir / "logs" / f"slurm-{job_id}.log").read_text()  # (the outcomes are also in the job's output)
    assert log.count("stopped by a signal before the trainer started (nothing to save): requeueing job") == 1, text
    assert log.count("before the first step: nothing new to save, exit 85") == 2, text
    assert log.count("preempted after a complete checkpoint: requeueing job") == 2, text
    assert "preempted after a complete checkpoint; SLURM has requeued the job itself" in text, text
    # after each of its own requeues the script says what SLURM will do (it asked)
    for restarts, resume in ((1, "the start"), (2, "the start"), (3, "step_00000050"), (5, "step_00000050")):
        assert (
            f"SLURM: job {job_id} is requeued (Restarts={restarts}; this allocation is " in text
            and f"it starts again when nodes are free and resumes from {resume}" in text
        ), text
    assert "crashed (exit" not in text and (run_dir / ".slurm_retries").read_text().strip() == "0", text
    assert "warning: the last checkpoint took" in text and "SIGNAL_MARGIN" in text, text
    assert "run finished" in text

    seen = events(run_dir)
    stops = [(e["step"], e.get("before_first_step", False)) for e in seen if e["event"] == "preempted"]
    assert stops == [(0, True), (50, False), (50, True)], seen
    assert [e["step"] for e in seen if e["event"] == "checkpoint"] == [50, 100, 120], seen  # step 50 saved once
    assert [e["step"] for e in seen if e["event"] == "start"] == [0, 0, 50, 50], seen

    reference, resumed = final_weights(two_node_run[1]), final_weights(run_dir)
    for kind in ("ema", "raw"):
        for name, tensor in reference[kind].items():
            assert torch.equal(tensor, resumed[kind][name]), f"{kind} {name} differs"

    # umask 027: group may read every file (none 0600, as safetensors wrote them), others nothing
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o777 for p in run_dir.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    wrong = {name: oct(mode) for name, mode in modes.items() if mode & 0o027 or mode & 0o640 != 0o640}
    assert not wrong, wrong


# ----------------------------------------------------------------------------------------------------------
# The trainer's own failure after a passed pre-flight check: never requeued
# ----------------------------------------------------------------------------------------------------------


def test_non_finite_steps_are_not_requeued(slurm_cluster, unattended_jobs):
    run_dir, job_id, out = unattended_jobs["non-finite"]
    job = slurm_cluster.wait(job_id, timeout=400)
    text = slurm_cluster.logs(run_dir, out, job_id)
    assert job.state == "FAILED" and job.exit_code == 3 and job.restarts == 0, (job.fields, text)
    assert "decision: exit 3, stop signal 0, new checkpoint 0, SLURM: running -> fail" in text, text
    assert "error: stopped on non-finite steps: not requeued" in text and "requeueing" not in text, text


# ----------------------------------------------------------------------------------------------------------
# A hung rank: found in minutes, the job requeued as a crash with progress, the run finished; the dead
# ranks' loader shared memory released by the next start on their node
# ----------------------------------------------------------------------------------------------------------


def test_hung_rank_is_found_by_the_watchdog_and_the_run_resumes(slurm_cluster, unattended_jobs, jobs_dir):
    run_dir, job_id, out = unattended_jobs["hang"]
    job = slurm_cluster.wait(job_id, timeout=600)
    text = slurm_cluster.logs(run_dir, out, job_id)
    assert job.state == "COMPLETED" and job.exit_code == 0 and job.restarts == 1, (job.fields, text)
    # rank 0 completed step 60 and waited in step 61's collective for the stopped rank 1; rank 1's own line
    # may be lost with its killed step's output, so the proof that the watchdog found this hang (not a slow
    # step of a loaded machine) is rank 0's last step
    assert "rank 0: error: no training step completed for" in text and "exiting with 5" in text, text
    assert "(last: step 60; train.hang_timeout_min=" in text, text
    assert re.search(r"crashed \(exit \d+\): retry 1/3 \(a new checkpoint since the last start\): requeueing", text)
    assert f"SLURM: job {job_id} is requeued (Restarts=1;" in text, text
    seen = events(run_dir)
    assert [e["step"] for e in seen if e["event"] == "start"] == [0, 50], seen
    assert seen[-1]["event"] == "done"

    # from the last step record before the hang to the trainer's exit: the watchdog plus srun's --wait
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = records[: [i for i, r in enumerate(records) if r.get("event") == "start"][1]]
    hung_at = max(r["time"] for r in first if "event" not in r and "step" in r)
    exited = re.search(r"\[(\S+ \S+)\] train_xl: trainer exited with (\d+)", text)
    exit_time = time.mktime(time.strptime(exited.group(1), "%Y-%m-%d %H:%M:%S"))
    assert exit_time - hung_at < HANG_MIN * 60 + SRUN_WAIT_S + 75, (exit_time - hung_at, text)

    # rank 0 left by os._exit (the watchdog), rank 1 killed: their loader shared memory stays on their nodes
    # unless Python's resource tracker (a process of its own, which may outlive its rank) cleans it first;
    # what is left, a later start on the node releases (this job's restart, or another job of the module's;
    # tests/unit/test_data_shm.py kills a reader with its tracker to test that path every time)
    released = [
        line
        for log in jobs_dir.glob("*/run/logs/slurm-*.log")
        for line in log.read_text().splitlines()
        if "released shared memory of a dead data loader" in line or "leaked shared_memory objects" in line
    ]
    assert released, text
    for node in ("node1", "node2"):  # every job has ended: nothing of a loader is left on a node
        shm = slurm_cluster.node_root(node) / "dev" / "shm"
        assert not _segments(shm), (node, sorted(p.name for p in shm.iterdir()))
