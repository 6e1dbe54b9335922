"""slurm/train_xl.sh on the local 2-node cluster: a tiny DiT on CPU (gloo), one process per task.

Runs to the end across two nodes and on one node with two tasks; survives a USR1 (save, requeue,
resume) with the same final weights as an uninterrupted run; fails at once, without requeue, on a bad
run directory, data path or configuration; gives up after a bounded number of crashes at start.
(The uninterrupted 2-node run and the dataset are session fixtures in conftest.py.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """EMA and raw (fp32 master) weights of the newest complete checkpoint, assembled over ranks."""
    from ditscale.engine.checkpoint import read_meta
    from ditscale.engine.export import weight_reader

    ckpt = run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip()
    meta = read_meta(ckpt)
    out = {}
    for kind in ("ema", "raw"):
        shapes, read = weight_reader(ckpt, meta, kind)
        out[kind] = {name: t.clone() for name, t in read(list(shapes)).items()}
    return out


def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "event" in e]


def check_finished(cluster, job, run_dir: Path, text: str, world_size: int) -> None:
    """Completed with exit 0; the last checkpoint is the final step, from `world_size` ranks."""
    assert job.state == "COMPLETED" and job.exit_code == 0, text
    final = f"step_{cluster.steps:08d}"
    assert (run_dir / "ckpt" / "latest").read_text().strip() == final, text
    meta = json.loads((run_dir / "ckpt" / final / "meta.json").read_text())
    assert meta["world_size"] == world_size and meta["step"] == cluster.steps
    assert len(list((run_dir / "ckpt" / final / "ema").glob("rank_*.safetensors"))) == world_size
    assert len(list((run_dir / "ckpt" / final).glob("*zero_pp_rank_*_optim_states.pt"))) == world_size
    assert events(run_dir)[-1]["event"] == "done"
    assert "run finished" in text and (run_dir / "config.yaml").is_file()


# ----------------------------------------------------------------------------------------------------------
# Runs to the end
# ----------------------------------------------------------------------------------------------------------


def test_two_nodes_one_task_each_run_to_the_end(slurm_cluster, two_node_run):
    job, run_dir, text = two_node_run
    check_finished(slurm_cluster, job, run_dir, text, world_size=2)
    assert job.fields["NodeList"] == "node[1-2]" and job.restarts == 0, job.fields
    assert "on node[1-2]: 2 node(s) x 1 task(s), device cpu, master node1:" in text


def test_one_node_two_tasks_runs_to_the_end(slurm_cluster, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job_id, out = slurm_cluster.train(run_dir, tiny_dataset, nodes=1, tasks_per_node=2)
    job = slurm_cluster.wait(job_id, timeout=600)
    text = slurm_cluster.logs(run_dir, out, job_id)
    check_finished(slurm_cluster, job, run_dir, text, world_size=2)
    assert job.fields["NodeList"] in ("node1", "node2") and "1 node(s) x 2 task(s)" in text


# ----------------------------------------------------------------------------------------------------------
# Preemption: USR1 -> checkpoint -> exit 85 -> requeue -> resume -> same weights
# ----------------------------------------------------------------------------------------------------------


def _training_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((json.loads(line).get("step", -1) for line in lines if line.endswith("}")), default=-1)


def test_preempted_run_requeues_resumes_and_matches(slurm_cluster, tiny_dataset, tmp_path, two_node_run):
    run_dir = tmp_path / "run"
    job_id, out = slurm_cluster.train(run_dir, tiny_dataset, nodes=2, tasks_per_node=1)
    deadline = time.monotonic() + 300
    while _training_step(run_dir) < 2:
        assert time.monotonic() < deadline, slurm_cluster.logs(run_dir, out, job_id)
        assert slurm_cluster.show(job_id).get("JobState") in ("PENDING", "RUNNING"), slurm_cluster.logs(
            run_dir, out, job_id
        )
        time.sleep(0.05)
    slurm_cluster.run("scancel", "--signal=USR1", "--full", job_id)
    job = slurm_cluster.wait(job_id, timeout=600)
    text = slurm_cluster.logs(run_dir, out, job_id)
    check_finished(slurm_cluster, job, run_dir, text, world_size=2)

    seen = events(run_dir)
    (preempted,) = [e["step"] for e in seen if e["event"] == "preempted"]
    starts = [e for e in seen if e["event"] == "start"]
    assert 2 <= preempted < slurm_cluster.steps and len(starts) == 2, seen
    assert starts[1]["step"] == preempted
    assert starts[1]["resumed_from"] == str(run_dir / "ckpt" / f"step_{preempted:08d}"), starts
    assert job.restarts == 1, job.fields
    assert "got SIGUSR1: forwarding to every task" in text
    assert "trainer exited with 85" in text and "preempted after a complete checkpoint: requeueing job" in text

    reference = final_weights(two_node_run[1])
    resumed = final_weights(run_dir)
    for kind in ("ema", "raw"):
        assert reference[kind].keys() == resumed[kind].keys()
        for name, tensor in reference[kind].items():
            assert torch.equal(tensor, resumed[kind][name]), f"{kind} {name} differs after the resume"


# ----------------------------------------------------------------------------------------------------------
# Failures: at once and not requeued / bounded retries
# ----------------------------------------------------------------------------------------------------------


def _bad_case(case: str, tmp_path: Path) -> tuple[dict, str]:
    """(job environment, expected message). Root writes through permission bits, so the unwritable run
    directory is one whose parent is a file: the same pre-flight check as a permission problem."""
    if case == "run dir":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        return {"RUN_DIR": str(blocker / "run")}, f"run directory '{blocker / 'run'}' is not writable"
    if case == "data":
        missing = tmp_path / "no-such-dataset"
        return {"DATA": str(missing)}, f"data path '{missing}' does not exist"
    return {"EXTRA": "train.max_stepz=3"}, "unknown config key 'train.max_stepz'; did you mean train.max_steps"


@pytest.mark.parametrize("case", ["run dir", "data", "config"])
def test_bad_input_fails_at_once_without_requeue(slurm_cluster, tiny_dataset, tmp_path, case):
    env, message = _bad_case(case, tmp_path)
    run_dir = tmp_path / "run"
    job_id, out = slurm_cluster.train(run_dir, tiny_dataset, nodes=1, tasks_per_node=1, env=env)
    job = slurm_cluster.wait(job_id, timeout=120)
    text = slurm_cluster.logs(run_dir, out, job_id)
    assert job.state == "FAILED" and job.exit_code == 2 and job.restarts == 0, (job.fields, text)
    assert message in text, text
    assert "train_xl: run:" not in text and not (run_dir / "ckpt").exists()


def test_damaged_shard_found_by_the_trainer_fails_without_requeue(slurm_cluster, tiny_dataset, tmp_path):
    """A byte flipped inside a shard passes the pre-flight check (the sizes match; hashes are --check=deep's);
    the trainer finds it when it reads the shard: exit 2 naming the dataset's file, the job FAILED and
    never requeued (the decision table's "2 during a run")."""
    import json
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(tiny_dataset, data)
    shard = json.loads((data / "index.json").read_text())["shards"][-1]
    bad = data / (shard.get("zip_data") or shard["raw_data"])["basename"]
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    bad.write_bytes(raw)
    run_dir = tmp_path / "run"
    job_id, out = slurm_cluster.train(run_dir, data, nodes=1, tasks_per_node=1)
    job = slurm_cluster.wait(job_id, timeout=300)
    text = slurm_cluster.logs(run_dir, out, job_id)
    assert job.state == "FAILED" and job.exit_code == 2 and job.restarts == 0, (job.fields, text)
    assert "train_xl: trainer exited with 2" in text and str(bad) in text, text
    assert "bad configuration or input, or no space for a checkpoint: not requeued" in text, text
    assert "requeueing" not in text, text


def test_stop_signal_before_srun_in_two_allocations_in_a_row_fails(slurm_cluster, tiny_dataset, tmp_path):
    """A stop signal that reaches the batch shell before srun (the script held there by its test hook) is
    requeued once with nothing lost; in the next allocation too, the job fails (is --time shorter than the
    --signal margin?) instead of requeueing empty allocations for ever."""
    run_dir = tmp_path / "run"
    env = {"DITSCALE_TEST_PAUSE": "0:script,1:script"}
    job_id, out = slurm_cluster.train(run_dir, tiny_dataset, nodes=1, tasks_per_node=1, env=env)

    def logs() -> str:
        return slurm_cluster.logs(run_dir, out, job_id)

    for allocation in (1, 2):
        deadline = time.monotonic() + 300
        while logs().count("test pause before srun: waiting for a stop signal") < allocation:
            assert time.monotonic() < deadline and slurm_cluster.show(job_id).get("JobState") != "FAILED", logs()
            time.sleep(0.2)
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=120)
    text = logs()
    assert job.state == "FAILED" and job.restarts == 1, (job.fields, text)
    requeued = "stopped by a signal before the trainer started (nothing to save): requeueing job"
    assert text.count(requeued) == 2, text  # once: in the job's output and in the run's log
    assert "a stop signal came before the trainer started in 2 allocations in a row" in text, text
    assert "trainer exited with" not in text, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the crash is CUDA missing on a GPU-less node")
def test_crash_at_start_requeues_a_bounded_number_of_times(slurm_cluster, tiny_dataset, tmp_path):
    """DITSCALE_DEVICE=cuda on a node without CUDA: the config check passes, every start crashes."""
    run_dir = tmp_path / "run"
    job_id, out = slurm_cluster.train(
        run_dir,
        tiny_dataset,
        nodes=1,
        tasks_per_node=1,
        env={"GPUS_PER_NODE": "1", "DITSCALE_DEVICE": "cuda", "MAX_RETRIES": "1"},
    )
    job = slurm_cluster.wait(job_id, timeout=300)
    text = slurm_cluster.logs(run_dir, out, job_id)
    assert job.state == "FAILED" and job.exit_code == 1 and job.restarts == 1, (job.fields, text)
    assert "crashed (exit 1): retry 1/1: requeueing job" in text
    assert "crashed (exit 1) 2 times in a row without a new checkpoint: giving up, not requeued" in text
    assert "CUDA is not available" in text


# ----------------------------------------------------------------------------------------------------------
# The same run dir, submitted again on another node count
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resubmitted_on_one_node_continues_and_scancel_stops_for_good(
    slurm_cluster, tiny_dataset, tmp_path, two_node_run
):
    """A copy of the finished 2-rank run, sbatch-ed again on 1 node x 1 task with more steps, resumes from
    its last checkpoint (world size 2 -> 1: the trainer's universal-checkpoint path). `scancel` then ends
    it for good: the trainer saves on the SIGTERM, and the job is not requeued."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_node_run[1], run_dir)
    job_id, out = slurm_cluster.train(
        run_dir,
        tiny_dataset,
        nodes=1,
        tasks_per_node=1,
        overrides=("train.max_steps=100000", "train.ckpt_every=100000"),
    )
    deadline = time.monotonic() + 300
    while _training_step(run_dir) < slurm_cluster.steps + 3:
        assert time.monotonic() < deadline, slurm_cluster.logs(run_dir, out, job_id)
        assert slurm_cluster.show(job_id).get("JobState") in ("PENDING", "RUNNING"), slurm_cluster.logs(
            run_dir, out, job_id
        )
        time.sleep(0.05)
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert starts[-1]["step"] == slurm_cluster.steps and starts[-1]["world_size"] == 1, starts

    slurm_cluster.run("scancel", job_id)
    job = slurm_cluster.wait(job_id, timeout=120)
    time.sleep(5)  # a wrongly requeued job would be back by now
    job = slurm_cluster.wait(job_id, timeout=120)
    deadline = time.monotonic() + 60  # the batch shell logs its decision within KillWait (30 s) of the scancel
    while "decision: exit" not in (text := slurm_cluster.logs(run_dir, out, job_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.state == "CANCELLED" and job.restarts == 0, (job.fields, text)
    assert "not requeued; sbatch again to resume from the newest checkpoint" in text, text
    saved = (run_dir / "ckpt" / "latest").read_text().strip()
    meta = json.loads((run_dir / "ckpt" / saved / "meta.json").read_text())
    assert meta["step"] > slurm_cluster.steps and meta["world_size"] == 1, (saved, text)
