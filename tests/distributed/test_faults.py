"""Faults on 2 CPU ranks (ZeRO-2): a stop signal to one rank, kill -9 inside a save, divergence, and
checkpoints that do not fit the run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from ds_launch import N, REPO, TINY, TOTAL, child_env, ckpt, metrics, reference_overrides, start_training, train

pytestmark = pytest.mark.distributed


def latest(run_dir) -> str:
    return (run_dir / "ckpt" / "latest").read_text().strip()


def test_sigusr1_to_one_rank_stops_both_at_the_same_step_then_resumes_exactly(reference_run, digits64, tmp_path):
    run_dir = tmp_path / "run"
    run = start_training(2, reference_overrides(2, run_dir, digits64, "train.max_steps=1000"), tmp_path / "a.log")
    rank1 = run.rank_pid(1)
    run.wait_for(lambda text: re.search(r"^step 2 \|", text, re.M), "step 2")
    os.kill(rank1, signal.SIGUSR1)
    assert run.wait() == 85, run.text()[-5000:]
    text = run.text()
    stops = {int(r): int(s) for r, s in re.findall(r"rank (\d): stop agreed at step (\d+)", text)}
    assert set(stops) == {0, 1} and len(set(stops.values())) == 1, text[-3000:]
    stop = stops[0]
    assert f"stopping at step {stop}: checkpoint complete, exit 85" in text
    meta = json.loads((ckpt(run_dir, stop) / "meta.json").read_text())
    assert meta["step"] == stop and latest(run_dir) == f"step_{stop:08d}"
    for rank in (0, 1):
        client = torch.load(ckpt(run_dir, stop) / "client" / f"rank_{rank:05d}.pt", weights_only=True)
        assert client["step"] == stop

    # Resume (train.resume=auto in the same run_dir) and compare with the uninterrupted reference.
    ref = reference_run(2)
    end = max(TOTAL, stop + 2)
    if end > TOTAL:     # a fast machine ran past the reference before the signal landed: extend it
        longer = train(2, reference_overrides(2, tmp_path / "ref", digits64, f"train.max_steps={end}"),
                       tmp_path / "ref.log")
        assert longer.returncode == 0, longer.output[-5000:]
        ref = tmp_path / "ref"
    resumed = train(2, reference_overrides(2, run_dir, digits64, f"train.max_steps={end}"), tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert f"at step {stop}" in resumed.output
    mref, mrun = metrics(ref), metrics(run_dir)
    for step in range(1, end + 1):
        assert mrun[step]["loss"] == mref[step]["loss"], step
        assert mrun[step]["index_sum"] == mref[step]["index_sum"], step


def test_kill_9_during_save_resumes_from_the_previous_checkpoint(digits64, tmp_path):
    run_dir = tmp_path / "run"
    overrides = reference_overrides(2, run_dir, digits64, f"train.max_steps={2 * N}")
    run = start_training(2, overrides, tmp_path / "a.log", env={"DITSCALE_TEST_HANG": f"save:1:{2 * N}"})
    marker = ckpt(run_dir, 2 * N) / ".hang_rank_1"
    run.wait_for(lambda _: marker.exists() and marker.read_text(), "rank 1 inside the save")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    assert run.wait() != 0
    assert latest(run_dir) == f"step_{N:08d}"
    assert not (ckpt(run_dir, 2 * N) / "meta.json").exists()
    first = metrics(run_dir)

    resumed = train(2, overrides, tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert f"resumed from {ckpt(run_dir, N)} at step {N}" in resumed.output
    assert f"skipping checkpoint {ckpt(run_dir, 2 * N)}" in resumed.output
    assert json.loads((ckpt(run_dir, 2 * N) / "meta.json").read_text())["step"] == 2 * N
    assert latest(run_dir) == f"step_{2 * N:08d}"
    again = metrics(run_dir)
    for step in range(N + 1, 2 * N + 1):
        assert again[step]["loss"] == first[step]["loss"], step


def test_divergence_stops_with_exit_3_keeping_the_last_good_checkpoint(digits64, tmp_path):
    run_dir = tmp_path / "run"
    result = train(2, reference_overrides(2, run_dir, digits64, "optim.lr=1e8", "train.max_nonfinite=3",
                                          "train.ckpt_every=2", "train.max_steps=50"), tmp_path / "a.log")
    assert result.returncode == 3, result.output[-5000:]
    m = metrics(run_dir)
    first_bad = min(s for s in m if m[s]["skipped_steps"] > 0)
    assert max(m) == first_bad + 2 and m[max(m)]["skipped_steps"] == 3
    good = latest(run_dir)
    assert int(good.split("_")[1]) < first_bad
    assert f"3 non-finite steps in a row (train.max_nonfinite=3)" in result.output
    assert f"last good checkpoint: {run_dir / 'ckpt' / good}" in result.output


def test_without_deepspeeds_overflow_check_a_nonfinite_loss_stops_before_saving(digits64, tmp_path):
    """In fp32 (as with bf16.check_grad_overflow=false) DeepSpeed applies every step and the step has no
    host sync: non-finite losses are found at the next log / checkpoint, and the run stops with exit 3
    without writing the poisoned weights. (One process: the fp32 ZeRO-1 CPU config.)"""
    run_dir = tmp_path / "run"
    out = single_process(reference_overrides(1, run_dir, digits64, "optim.lr=1e8", "train.ckpt_every=2",
                                             "train.max_steps=50", "log.every=10",
                                             "engine.ds_config=ds_configs/zero1_fp32_cpu.json"), tmp_path)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "non-finite losses, and DeepSpeed did not skip their steps" in out.stdout
    stopped = int(re.search(r"at step (\d+): stopping", out.stdout).group(1))
    saved = [int(p.name.split("_")[1]) for p in (run_dir / "ckpt").glob("step_*")]
    assert saved and max(saved) < stopped and latest(run_dir) == f"step_{max(saved):08d}"


def single_process(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditscale.train", "--config", str(TINY), *args], cwd=REPO,
                          env=child_env({"DITSCALE_DATA_CACHE": str(tmp_path / "cache")}), capture_output=True,
                          text=True, timeout=600)


def test_config_that_does_not_match_the_checkpoint_is_exit_2_naming_the_keys(reference_run, digits64, tmp_path):
    ref = reference_run(2)
    out = single_process(reference_overrides(2, tmp_path / "run", digits64, f"train.resume={ckpt(ref, N)}",
                                             "optim.lr=5e-4", "model.class_dropout_prob=0.2"), tmp_path)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"does not match checkpoint {ckpt(ref, N)}" in out.stderr
    assert "optim.lr: checkpoint 0.001, now 0.0005" in out.stderr
    assert "model.class_dropout_prob: checkpoint 0.1, now 0.2" in out.stderr


def test_unreadable_checkpoint_is_exit_2_naming_the_file(reference_run, digits64, tmp_path):
    import shutil

    broken = tmp_path / "ckpt" / f"step_{N:08d}"
    shutil.copytree(ckpt(reference_run(2), N), broken)
    victim = sorted(broken.glob("*optim_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    out = single_process(reference_overrides(2, tmp_path / "run", digits64, f"train.resume={broken}"), tmp_path)
    assert out.returncode == 2
    assert f"checkpoint file {victim} has 100 bytes" in out.stderr
