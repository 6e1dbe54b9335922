"""Preemption: SIGTERM / SIGUSR1 on any rank → every rank stops at the same step boundary.

`catch_stop_signals()` is the trainer's first statement: from then until the process exits a stop signal
only sets a flag (never the default action, which kills the rank), whether it comes during start-up, in
the loop or after the final checkpoint. The trainer asks `StopRequest.agreed` before its first step (a
signal during start-up: exit EXIT_PREEMPTED with nothing to save) and at step boundaries (every `every`
steps: save, then exit EXIT_PREEMPTED); after the final checkpoint a signal changes nothing (exit 0).
The ranks all-reduce the flag (MAX) on a gloo group of CPU tensors: no GPU stream is synchronised, so
checking every step costs a few microseconds of host-side network latency.

Inside `StopRequest.waiting()` (the trainer's wait for its next batch) a stop signal gives the wait
`data_wait_s` more seconds: a batch that comes in time is trained on and the stop is agreed at the step
boundary as usual (with a checkpoint). A wait still blocked then raises StopWaiting, so that a rank stuck on
data still stops (without a new checkpoint: nothing new can be saved while a rank is stuck). A timer thread
cuts the wait by sending the same signal to the main thread once more.

This module imports nothing heavy (no torch at import time): the trainer imports it before torch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

EXIT_PREEMPTED = 85
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None  # the first stop signal this process got (a process-wide latch)
_waiting_pid: int | None = None  # the process inside StopRequest.waiting() (not forked loader workers)
_wait_grace_s = 0.0  # how long that wait may go on after a stop signal
_wait_deadline: float | None = None  # monotonic time at which the current wait gives up (None: no stop yet)
_wait_timer: threading.Timer | None = None


class StopWaiting(Exception):
    """A stop signal arrived while the trainer was blocked in `StopRequest.waiting()`, and no batch came within
    the wait's grace period."""


def _record(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    if _waiting_pid == os.getpid():
        _limit_wait(signum)


def _limit_wait(signum: int) -> None:
    """In the waiting process: raise StopWaiting once the grace period is over, else arm the timer that
    signals the main thread when it is."""
    global _wait_deadline, _wait_timer
    now = time.monotonic()
    if _wait_deadline is None:
        _wait_deadline = now + _wait_grace_s
    if now >= _wait_deadline:
        raise StopWaiting(signal.Signals(signum).name)
    if _wait_timer is None:
        main = threading.main_thread().ident
        _wait_timer = threading.Timer(_wait_deadline - now, signal.pthread_kill, (main, signum))
        _wait_timer.daemon = True
        _wait_timer.start()


def catch_stop_signals(signals=STOP_SIGNALS) -> None:
    """From now until the process exits, a stop signal only records itself (idempotent)."""
    for s in signals:
        if signal.getsignal(s) is not _record:
            signal.signal(s, _record)


def release_stop_signals(signals=STOP_SIGNALS) -> None:
    """Default handlers again and no signal recorded: for code that runs the trainer in-process and goes on
    (tests, benchmarks). The trainer itself never releases them."""
    global _received, _waiting_pid
    for s in signals:
        signal.signal(s, signal.SIG_DFL)
    _received = _waiting_pid = None
    _end_wait()


def _end_wait() -> None:
    global _wait_deadline, _wait_timer
    if _wait_timer is not None:
        _wait_timer.cancel()
    _wait_deadline = _wait_timer = None


def stop_received() -> int | None:
    """The first stop signal this process got, or None."""
    return _received


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal on another rank"


def shield_helpers(signals=STOP_SIGNALS) -> None:
    """Start multiprocessing's resource tracker now, with the stop signals ignored (inherited across
    exec): SLURM signals every process of a step, and a tracker killed by SIGUSR1 would leave the data
    loader's shared memory behind."""
    from multiprocessing import resource_tracker

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        resource_tracker.ensure_running()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopRequest:
    """The ranks' collective decision on a stop signal (handlers: `catch_stop_signals`)."""

    def __init__(self, every: int = 1, signals=STOP_SIGNALS, data_wait_s: float = 0.0):
        self.every = every
        self.data_wait_s = data_wait_s
        self._group = None
        catch_stop_signals(signals)
        shield_helpers(signals)

    @property
    def received(self) -> int | None:
        return _received

    def restore(self, signals=STOP_SIGNALS) -> None:
        """Default handlers again, the signal seen so far kept (in-process callers; see release_stop_signals)."""
        _end_wait()
        for s in signals:
            signal.signal(s, signal.SIG_DFL)

    @contextmanager
    def waiting(self):
        """A blocking wait (for data) that a stop signal, during the wait or before it, cuts short with
        StopWaiting once it has gone on `data_wait_s` seconds after the signal (or after its start)."""
        global _waiting_pid, _wait_grace_s
        _wait_grace_s = self.data_wait_s
        try:
            _waiting_pid = os.getpid()
            if _received is not None:
                _limit_wait(_received)
            yield
        finally:
            _waiting_pid = None
            _end_wait()

    def _cpu_group(self):
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._group

    def agreed(self, step: int, *, now: bool = False) -> bool:
        """True on every rank iff some rank got a stop signal (checked when step % every == 0, or `now`)."""
        import torch
        import torch.distributed as dist

        if step % self.every and not now:
            return False
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return _received is not None
        flag = torch.tensor([0 if _received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group())
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal_name(_received)


#################################################################################
#                           Test hook: a known moment                           #
#################################################################################


def pause_for_test(point: str, timeout_s: float = 600.0) -> None:
    """For the SLURM tests only: DITSCALE_TEST_PAUSE="R:POINT,..." makes allocation R (SLURM_RESTART_COUNT,
    0 outside SLURM) wait at POINT (start, loop, data:N (in the wait for step N's batch), step:N, save:N,
    grid:N (rank 0, before the sampling of step N's grid), done) until a stop signal has arrived, so a test signals at a known moment of the run (or lets the job's
    --time limit do it) without timing guesses; "R:POINT:hang:RANK" makes that rank stop itself there
    (SIGSTOP: a hung rank); "R:POINT:stuck" makes it wait there for timeout_s whatever comes (a loader
    that never delivers). Each rank prints a line when it starts waiting."""
    spec = os.environ.get("DITSCALE_TEST_PAUSE")
    if not spec:
        return
    restart = os.environ.get("SLURM_RESTART_COUNT") or "0"
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    items = spec.split(",")
    if f"{restart}:{point}:hang:{rank}" in items:
        print(f"[ditscale.train] rank {rank}: test pause at {point}: SIGSTOP (a hung rank)", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    if f"{restart}:{point}:stuck" in items:
        print(f"[ditscale.train] rank {rank}: test pause at {point}: stuck", flush=True)
        time.sleep(timeout_s)
    if f"{restart}:{point}" not in items:
        return
    print(f"[ditscale.train] rank {rank}: test pause at {point}: waiting for a stop signal", flush=True)
    deadline = time.monotonic() + timeout_s
    while _received is None and time.monotonic() < deadline:
        time.sleep(0.05)
    print(
        f"[ditscale.train] rank {rank}: test pause at {point}: "
        f"{signal_name(_received) if _received else 'no signal'}, going on",
        flush=True,
    )
