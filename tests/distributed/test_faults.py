"""Faults on 2 CPU ranks (ZeRO-2; 3 ranks under ZeRO-3, where partitions are padded): a stop signal to one
rank, kill -9 inside a save, divergence, skipped steps at the end of a run, a flipped byte in a checkpoint, a
full disk, and checkpoints that do not fit the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from ds_launch import (
    REPO,
    TINY,
    TOTAL,
    N,
    child_env,
    ckpt,
    metrics,
    reference_overrides,
    start_training,
    tensor_leaves,
    train,
)


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
    if end > TOTAL:  # a fast machine ran past the reference before the signal landed: extend it
        longer = train(
            2, reference_overrides(2, tmp_path / "ref", digits64, f"train.max_steps={end}"), tmp_path / "ref.log"
        )
        assert longer.returncode == 0, longer.output[-5000:]
        ref = tmp_path / "ref"
    resumed = train(2, reference_overrides(2, run_dir, digits64, f"train.max_steps={end}"), tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert f"at step {stop}" in resumed.output
    mref, mrun = metrics(ref), metrics(run_dir)
    for step in range(1, end + 1):
        assert mrun[step]["loss"] == mref[step]["loss"], step
        assert mrun[step]["index_sum"] == mref[step]["index_sum"], step


@pytest.mark.parametrize("loader", ["delivers", "stuck"])
def test_stop_signal_in_a_data_wait_saves_unless_the_data_never_comes(loader, digits64, tmp_path):
    """SIGUSR1 while the trainer waits for step 4's batch (a test pause inside the wait). A batch that comes
    within train.stop_data_wait_s is trained on and the stop saves step 4 (SLURM's signal can land in any
    data wait: losing the steps since the last checkpoint there was the old behaviour). A loader that never
    delivers is given up after those seconds: exit 85 with the previous checkpoint kept."""
    run_dir = tmp_path / "run"
    pause = "0:data:4" if loader == "delivers" else "0:data:4:stuck"
    overrides = reference_overrides(
        0, run_dir, digits64, "train.max_steps=1000", "train.ckpt_every=2", "train.stop_data_wait_s=1"
    )
    run = start_training(1, overrides, tmp_path / "a.log", env={"DITSCALE_TEST_PAUSE": pause})
    rank0 = run.rank_pid(0)
    run.wait_for(lambda text: "test pause at data:4" in text, "the pause in the wait for step 4's batch")
    os.kill(rank0, signal.SIGUSR1)
    assert run.wait() == 85, run.text()[-5000:]
    text = run.text()
    if loader == "delivers":
        assert "rank 0: stop agreed at step 4 (SIGUSR1)" in text, text[-3000:]
        assert latest(run_dir) == "step_00000004" and max(metrics(run_dir)) == 4
    else:
        assert "SIGUSR1, and no batch for step 4 within train.stop_data_wait_s=1 s" in text, text[-3000:]
        assert latest(run_dir) == "step_00000002" and max(metrics(run_dir)) == 3


def test_stop_signal_during_a_sample_grid_cuts_it_short_and_saves(digits64, tmp_path):
    """SIGUSR1 to rank 0 as it starts step 4's sample grid (rank 1 waits in the barrier after it): the grid
    stops at its next sampler step, unwritten, and both ranks save step 4 and exit 85. Without the cut the
    grid would run to its end first, however long SLURM's signal margin is."""
    run_dir = tmp_path / "run"
    overrides = reference_overrides(
        2, run_dir, digits64, "train.max_steps=1000", "train.ckpt_every=100", "sample.every=4", "sample.steps=50"
    )
    run = start_training(2, overrides, tmp_path / "a.log", env={"DITSCALE_TEST_PAUSE": "0:grid:4"})
    run.wait_for(lambda text: "test pause at grid:4" in text, "rank 0 at step 4's sample grid")
    os.kill(run.rank_pid(0), signal.SIGUSR1)
    assert run.wait() == 85, run.text()[-5000:]
    text = run.text()
    assert "sample grid of step 4 left unfinished: SIGUSR1, stopped before step 1 of 50" in text, text[-3000:]
    assert "stop agreed at step 4 (SIGUSR1)" in text and "stop agreed at step 4 (a signal on another rank)" in text
    assert latest(run_dir) == "step_00000004"
    assert not (run_dir / "samples" / "grid_00000004.png").exists()


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
    result = train(
        2,
        reference_overrides(
            2, run_dir, digits64, "optim.lr=1e8", "train.max_nonfinite=3", "train.ckpt_every=2", "train.max_steps=50"
        ),
        tmp_path / "a.log",
    )
    assert result.returncode == 3, result.output[-5000:]
    m = metrics(run_dir)
    first_bad = min(s for s in m if m[s]["skipped_steps"] > 0)
    assert max(m) == first_bad + 2 and m[max(m)]["skipped_steps"] == 3
    good = latest(run_dir)
    assert int(good.split("_")[1]) < first_bad
    assert "3 non-finite steps in a row (train.max_nonfinite=3)" in result.output
    assert f"last good checkpoint: {run_dir / 'ckpt' / good}" in result.output


def single_process(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ditscale.train", "--config", str(TINY), *args],
        cwd=REPO,
        env=child_env({"DITSCALE_DATA_CACHE": str(tmp_path / "cache")}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_config_that_does_not_match_the_checkpoint_is_exit_2_naming_the_keys(reference_run, digits64, tmp_path):
    ref = reference_run(2)
    out = single_process(
        reference_overrides(
            2,
            tmp_path / "run",
            digits64,
            f"train.resume={ckpt(ref, N)}",
            "optim.lr=5e-4",
            "model.class_dropout_prob=0.2",
            "objective.kind=flow",
        ),
        tmp_path,
    )
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"does not match checkpoint {ckpt(ref, N)}" in out.stderr
    assert "optim.lr: checkpoint 0.001, now 0.0005" in out.stderr
    assert "model.class_dropout_prob: checkpoint 0.1, now 0.2" in out.stderr
    assert "objective.kind: checkpoint 'ddpm', now 'flow'" in out.stderr


def test_unreadable_checkpoint_is_exit_2_naming_the_file(reference_run, digits64, tmp_path):
    import shutil

    broken = tmp_path / "ckpt" / f"step_{N:08d}"
    shutil.copytree(ckpt(reference_run(2), N), broken)
    victim = sorted(broken.glob("*optim_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    out = single_process(reference_overrides(2, tmp_path / "run", digits64, f"train.resume={broken}"), tmp_path)
    assert out.returncode == 2
    assert f"checkpoint file {victim} has 100 bytes" in out.stderr


#################################################################################
#         Checkpoints that prove themselves (issue 19): replays of each failure   #
#################################################################################


def zero3_3_ranks(run_dir, data, *extra) -> list[str]:
    return reference_overrides(3, run_dir, data, "train.global_batch=6", *extra)


def fp32(run_dir, data, *extra) -> list[str]:
    return reference_overrides(1, run_dir, data, "engine.ds_config=ds_configs/zero1_fp32_cpu.json", *extra)


def padding_of(model_states: dict, rank: int, world: int, group: int):
    """(start, end) of the padding in rank's flat fp32 group: parameters in order, each cut in world slices."""
    import math

    offset = 0
    for shape in model_states["param_shapes"][group].values():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        real = max(0, min(part, numel - rank * part))
        if real < part:
            yield offset + real, offset + part
        offset += part


def flip_a_tensor_byte(f) -> None:
    """Flip one byte in the middle of the largest tensor's storage of a torch zip file (size unchanged)."""
    import zipfile

    with zipfile.ZipFile(f) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(f.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x10
    f.write_bytes(bytes(data))


def test_zero3_flipped_byte_is_caught_and_resume_falls_back_padding_is_zero(digits64, tmp_path):
    """Issue 19, failure 1 and the ZeRO-3 padding, on 3 ranks."""
    run_dir = tmp_path / "run"
    overrides = zero3_3_ranks(run_dir, digits64, f"train.max_steps={2 * N}")
    first = train(3, overrides, tmp_path / "a.log")
    assert first.returncode == 0, first.output[-5000:]
    assert f"checkpoint step_{2 * N:08d} is complete" in first.output
    for step in (N, 2 * N):  # every file recorded with its checksum; no NaN anywhere
        meta = json.loads((ckpt(run_dir, step) / "meta.json").read_text())
        assert meta["files"] and all(set(e) == {"bytes", "xxh3_64"} for e in meta["files"].values())
    path = ckpt(run_dir, 2 * N)
    for rank in range(3):
        model = torch.load(next(path.glob(f"zero_pp_rank_{rank}_*model_states.pt")), weights_only=False)
        optim = torch.load(next(path.glob(f"*zero_pp_rank_{rank}_*optim_states.pt")), weights_only=False)
        for where, t in tensor_leaves(optim):
            assert not t.is_floating_point() or torch.isfinite(t).all(), (rank, where)
        sd = optim["optimizer_state_dict"]
        padded = 0
        for g, flat in enumerate(sd["fp32_flat_groups"]):
            states = [v for v in sd["optimizer_state_dict"]["state"][g].values() if v.shape == flat.shape]
            for lo, hi in padding_of(model, rank, 3, g):
                padded += hi - lo
                for t in [flat, *states]:
                    assert (t[lo:hi] == 0).all(), (rank, g, lo, hi)
        assert padded > 0 or rank < 2  # the last rank's slices run past the parameters' ends

    victim = sorted(path.glob("bf16_zero_pp_rank_1_*_optim_states.pt"))[0]
    flip_a_tensor_byte(victim)
    torch.load(victim, weights_only=False)  # torch still reads it: only the checksum tells
    verify = subprocess.run(
        [sys.executable, "-m", "ditscale.engine.checkpoint", "verify", str(run_dir)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"{path}: BAD: checkpoint file {victim} is corrupt" in verify.stdout
    assert f"resume auto would start from: {ckpt(run_dir, N)}" in verify.stdout

    before = metrics(run_dir)
    resumed = train(3, overrides, tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert f"skipping checkpoint {path}: checkpoint file {victim} is corrupt" in resumed.output
    assert f"resumed from {ckpt(run_dir, N)} at step {N}" in resumed.output
    again = metrics(run_dir)
    for step in range(N + 1, 2 * N + 1):  # retrained from the good checkpoint, exactly
        assert again[step]["loss"] == before[step]["loss"], step
    assert latest(run_dir) == f"step_{2 * N:08d}"
    aside = [p for p in (run_dir / "ckpt").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and (aside[0] / path.name / victim.name).exists()  # kept for a post-mortem


def test_fp32_skipped_steps_never_end_in_done_without_the_final_checkpoint(tmp_path):
    """Issue 19, failure 3: lr=1e10 in fp32, every save inside a run of skipped steps."""
    from data_prep.testing import write_synthetic_latents

    data = write_synthetic_latents(str(tmp_path / "data"), 16, latent_size=8, num_classes=10)
    run_dir = tmp_path / "run"
    out = single_process(fp32(run_dir, data, "optim.lr=1e10", "train.max_steps=6", "train.ckpt_every=1"), tmp_path)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "done:" not in out.stdout
    m = metrics(run_dir)
    skipped = m[6]["skipped_steps"]
    good = latest(run_dir)
    assert (
        skipped > 0
        and f"train.max_steps reached, but the last {skipped} step(s) were skipped by DeepSpeed" in out.stdout
    )
    assert f"last good checkpoint: {run_dir / 'ckpt' / good}" in out.stdout
    assert not (ckpt(run_dir, 6) / "meta.json").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16_unchecked"])
def test_one_nan_sample_is_skipped_by_deepspeed_or_stops_the_run(precision, tmp_path):
    """Issue 19, failure 3's second half: one NaN sample. fp32: DeepSpeed skips that step (the trainer asks
    it, not the precision), the run finishes with its final checkpoint. bf16 without DeepSpeed's overflow
    check: the step is applied, the run stops with exit 3 before saving the poisoned weights."""
    from data_prep.testing import write_synthetic_latents

    data = write_synthetic_latents(str(tmp_path / "data"), 16, latent_size=8, num_classes=10, nan_samples=(3,))
    run_dir = tmp_path / "run"
    common = ["data.shuffle=false", "train.max_steps=4", "train.ckpt_every=1"]
    if precision == "fp32":
        out = single_process(fp32(run_dir, data, *common), tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "skipped by DeepSpeed (non-finite gradients)" in out.stdout and "the weights took them" not in out.stdout
        assert re.search(r"done: 4 steps, [12] skipped by DeepSpeed", out.stdout)
        assert latest(run_dir) == "step_00000004"
    else:
        ds = json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())
        ds["bf16"]["check_grad_overflow"] = False
        (tmp_path / "unchecked.json").write_text(json.dumps(ds))
        out = single_process(
            reference_overrides(2, run_dir, data, f"engine.ds_config={tmp_path / 'unchecked.json'}", *common), tmp_path
        )
        assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
        assert (
            "non-finite values (losses or gradient norms) in steps DeepSpeed applied: the weights took them"
            in out.stdout
        )
        stopped = int(re.search(r"at step (\d+): stopping", out.stdout).group(1))
        saved = [int(p.name.split("_")[1]) for p in (run_dir / "ckpt").glob("step_*")]
        assert max(saved, default=0) < stopped


def test_async_nonfinite_check_stops_at_the_next_step_with_no_log_or_save_due(tmp_path):
    """engine.nonfinite_check=async (bf16, DeepSpeed's overflow check off, no host sync per step): the NaN
    sample's step is applied, the next step's poll reads its count, and the run stops with exit 3 long
    before any log or checkpoint is due, writing none."""
    from data_prep.testing import write_synthetic_latents

    data = write_synthetic_latents(str(tmp_path / "data"), 16, latent_size=8, num_classes=10, nan_samples=(3,))
    run_dir = tmp_path / "run"
    out = single_process(
        reference_overrides(
            2,
            run_dir,
            data,
            "engine.nonfinite_check=async",
            "data.shuffle=false",
            "train.max_steps=8",
            "train.ckpt_every=1000",
            "log.every=1000",
        ),
        tmp_path,
    )
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "in steps DeepSpeed applied: the weights took them" in out.stdout
    stopped = int(re.search(r"at step (\d+): stopping", out.stdout).group(1))
    assert stopped < 8 and not list((run_dir / "ckpt").glob("step_*")), stopped


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk (root only): the real ENOSPC of a full filesystem."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
    reference_run, digits64, tmp_path, small_disk
):
    """Issue 19, failure 2: 2 ranks ZeRO-2 with run_dir on a tmpfs. A first save that does not fit fails with
    ENOSPC: every rank reports it, the partial checkpoint is removed, exit 2. With room for one checkpoint
    only, the next save is refused before anything is written, naming the path and the bytes."""
    from ditscale.engine.checkpoint import checkpoint_bytes, verify_run

    disk, resize = small_disk
    run_dir = disk / "run"
    overrides = reference_overrides(2, run_dir, digits64, f"train.max_steps={2 * N}")
    full = train(2, overrides, tmp_path / "a.log")
    assert full.returncode == 2, full.output[-5000:]
    reports = re.findall(
        rf"rank (\d): error: checkpoint {re.escape(str(ckpt(run_dir, N)))} could not be written "
        rf"\(rank \d: writing .+ failed: no space left on device",
        full.output,
    )
    assert sorted(reports) == ["0", "1"], full.output[-5000:]
    assert "the partial checkpoint was removed and `latest` still names no checkpoint yet" in full.output
    assert not ckpt(run_dir, N).exists() and not (run_dir / "ckpt" / "latest").exists()

    size = checkpoint_bytes(json.loads((ckpt(reference_run(2), N) / "meta.json").read_text()))
    resize(f"{(64 << 10) + size * 5 // 4}")  # this run's files and 1.25 checkpoints
    short = train(2, overrides, tmp_path / "b.log")
    assert short.returncode == 2, short.output[-5000:]
    refused = re.findall(
        rf"rank (\d): error: not enough free space to save checkpoint "
        rf"{re.escape(str(ckpt(run_dir, 2 * N)))}: it needs about (\d+) bytes",
        short.output,
    )
    assert sorted(r for r, _ in refused) == ["0", "1"], short.output[-5000:]
    assert int(refused[0][1]) > size and f"`latest` still names step_{N:08d}" in short.output
    assert latest(run_dir) == f"step_{N:08d}" and not ckpt(run_dir, 2 * N).exists()
    assert verify_run(run_dir, out=lambda *_: None) == 0  # the last checkpoint is intact
