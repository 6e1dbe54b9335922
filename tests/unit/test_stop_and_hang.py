"""Stop signals are recorded from the trainer's first line to its exit; the trainer's process exit; the step
watchdog; files follow the umask; slurm/train_xl.sh's decision table, row by row (the script's own
`--decide`); the rendezvous port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ditscale.engine.watchdog import EXIT_HUNG, StepWatchdog

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------------


def test_a_stop_signal_is_recorded_never_fatal_and_the_handlers_stay(tmp_path):
    """In a fresh interpreter (the handlers are process-wide): both signals are survived, the first is kept,
    and a test pause waits for a signal on the allocation it names only."""
    code = r"""
import os, signal, time
from ditscale.engine import signals
assert 'torch' not in __import__('sys').modules          # cheap enough to come before torch
signals.catch_stop_signals()
os.environ.update(DITSCALE_TEST_PAUSE="1:start,0:loop", SLURM_RESTART_COUNT="1")
signals.pause_for_test("loop")                          # another allocation's point: no wait
pid = os.fork()
if pid == 0:
    time.sleep(0.3); os.kill(os.getppid(), signal.SIGUSR1); os._exit(0)
signals.pause_for_test("start")                         # waits for the child's SIGUSR1
os.kill(os.getpid(), signal.SIGTERM)
signals.catch_stop_signals()                            # idempotent
print(signals.signal_name(signals.stop_received()), signals.stop_received() == signal.SIGUSR1)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SLURM_PROCID", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "SIGUSR1 True", out.stdout
    assert "rank 0: test pause at start: waiting for a stop signal" in out.stdout
    assert "test pause at loop" not in out.stdout


def test_exit_process_runs_the_python_exit_work_and_skips_finalization():
    """The trainer's exit: a running non-daemon thread is joined, atexit handlers run, buffered output
    reaches the pipe, the code is kept; objects are not finalized (no __del__ at exit)."""
    code = r"""
import atexit, sys, threading, time
from ditscale.engine.launch import exit_process

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

keep = Finalized()
atexit.register(print, "atexit ran")
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
sys.stdout.write("buffered, no newline ")
exit_process(7)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 7, out.stderr
    assert out.stdout.split() == ["buffered,", "no", "newline", "thread", "done", "atexit", "ran"], out.stdout


# ----------------------------------------------------------------------------------------------------------
# Step watchdog
# ----------------------------------------------------------------------------------------------------------


class _Exit(Exception):
    pass


def _watchdog(timeout_s: float):
    fired = []
    dog = StepWatchdog(timeout_s / 60, rank=3, exit=fired.append, poll_s=0.02)
    return dog, fired


def test_watchdog_fires_after_the_timeout_without_a_step_with_stacks(capfd):
    dog, fired = _watchdog(0.2)
    time.sleep(0.4)
    assert fired == []  # not armed before the first step
    dog.beat(7)
    for _ in range(3):
        time.sleep(0.1)
        dog.beat(8)  # steps keep coming: quiet
    assert fired == []
    time.sleep(0.5)
    assert fired == [EXIT_HUNG]
    err = capfd.readouterr().err
    assert "rank 3: error: no training step completed for" in err and "last: step 8" in err
    assert "train.hang_timeout_min=" in err and "Thread 0x" in err


def test_watchdog_is_quiet_while_paused_and_restarts_its_clock_after():
    dog, fired = _watchdog(0.2)
    dog.beat(1)
    with dog.paused("checkpoint save"):
        time.sleep(0.5)
    time.sleep(0.1)
    assert fired == []
    time.sleep(0.4)
    assert fired == [EXIT_HUNG]
    dog.close()


def test_watchdog_off_and_closed():
    dog, fired = _watchdog(0.0)
    assert dog._thread is None
    dog, fired = _watchdog(0.2)
    dog.beat(1)
    dog.close()
    time.sleep(0.4)
    assert fired == []


# ----------------------------------------------------------------------------------------------------------
# Files follow the umask
# ----------------------------------------------------------------------------------------------------------


def test_safetensors_files_follow_the_umask(tmp_path):
    import torch

    from ditscale.engine.ema import ShardedEMA
    from ditscale.files import save_safetensors

    old = os.umask(0o027)
    try:
        path = save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        ema = ShardedEMA.__new__(ShardedEMA)
        ema.shards, ema.ema, ema.decay = [], [], 0.9
        ema.save(tmp_path / "ema.safetensors")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "ema.safetensors").stat().st_mode & 0o777) == oct(0o640)


# ----------------------------------------------------------------------------------------------------------
# train_xl.sh's decision table
# ----------------------------------------------------------------------------------------------------------

ROWS = [  # RC SIGNAL NEW_CKPT SLURM RETRIES MAX UNSTARTED -> action, retries, words of the message
    ("0 1 0 running 2 3 0", "finish", 0, "run finished (the stop signal came after the final checkpoint)"),
    ("0 0 1 ended:COMPLETING 1 3 0", "finish", 0, "run finished"),
    ("2 1 0 running 1 3 0", "fail", 1, "bad configuration or input, or no space for a checkpoint: not requeued"),
    ("3 0 1 running 1 3 0", "fail", 0, "non-finite steps: not requeued"),
    ("85 1 1 running 2 3 0", "requeue", 0, "preempted after a complete checkpoint"),
    ("85 1 0 running 2 3 0", "requeue", 2, "preempted after a complete checkpoint"),
    ("none 1 0 running 1 3 1", "requeue", 1, "stopped by a signal before the trainer started"),
    ("none 1 0 running 1 3 2", "fail", 1, "before the trainer started in 2 allocations in a row"),
    ("138 1 0 running 2 3 0", "requeue", 2, "exit 138 after a stop signal (not a crash"),
    ("1 0 0 running 1 3 0", "requeue", 2, "crashed (exit 1): retry 2/3"),
    ("5 0 1 running 3 3 0", "requeue", 1, "crashed (exit 5): retry 1/3 (a new checkpoint since the last start)"),
    ("1 0 0 running 3 3 0", "fail", 4, "crashed (exit 1) 4 times in a row without a new checkpoint: giving up"),
    ("85 1 1 requeued 0 3 0", "leave", 0, "SLURM has requeued the job itself"),
    ("1 0 0 requeued 3 3 0", "leave", 4, "SLURM has requeued the job itself"),
    ("none 1 0 requeued 0 3 2", "leave", 0, "SLURM has requeued the job itself"),
    (
        "85 1 1 ended:CANCELLED 0 3 0",
        "leave",
        0,
        "the job is CANCELLED (cancelled, past its time limit or preempted) "
        "and SLURM will not requeue it: not requeued; sbatch again",
    ),
    ("85 0 1 ended:TIMEOUT 0 3 0", "leave", 0, "the job is TIMEOUT"),
    ("1 0 0 unknown 0 3 0", "leave", 1, "SLURM did not answer"),
]


def test_decision_table_rows():
    script = "\n".join(f"slurm/train_xl.sh --decide {args}" for args, *_ in ROWS)
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(ROWS), out.stdout
    for (args, action, retries, words), line in zip(ROWS, lines):
        got_action, got_retries, why = line.split(" ", 2)
        assert (got_action, int(got_retries)) == (action, retries), (args, line)
        assert words in why, (args, line)
        assert ("retry" in why) == (action == "requeue" and "crashed" in why), (args, line)


def test_decide_with_missing_arguments_is_exit_2():
    out = subprocess.run(["slurm/train_xl.sh", "--decide", "0", "1"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--decide takes RC SIGNAL NEW_CKPT SLURM RETRIES MAX UNSTARTED" in out.stderr


def test_rendezvous_port_skips_one_taken_on_the_node():
    """Two jobs on one node whose ids are 15,000 apart derive the same port: the second one (or any job whose
    port another server holds) takes the next free one instead of failing its rendezvous."""

    def port_for(job_id: int, **env) -> int:
        out = subprocess.run(
            ["bash", "-c", 'source slurm/common.sh && rendezvous_env && echo "$MASTER_PORT"'],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "SLURM_JOB_ID": str(job_id),
                "MASTER_ADDR": "localhost",
                "PYTHON": sys.executable,
                **env,
            },
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    held = socket.socket()
    for k in range(7919, 15000, 13):  # a port of the range that is free here, held like a live rendezvous
        try:
            held.bind(("", 15000 + k))
            break
        except OSError:
            continue
    with held:
        held.listen()
        taken = held.getsockname()[1]
        job = taken - 15000 + 3 * 15000  # 15000 + job % 15000 == taken
        got = port_for(job)
        assert got != taken and 15000 <= got < 30000, got
        with socket.socket() as probe:
            probe.bind(("", got))  # free indeed
        assert port_for(job, MASTER_PORT="23456") == 23456  # the user's choice is kept
    assert port_for(job) == taken  # free again: the job's own port
