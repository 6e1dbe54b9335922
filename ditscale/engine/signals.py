"""Preemption: SIGTERM / SIGUSR1 on any rank → every rank stops at the same step boundary.

`catch_stop_signals()` is the trainer's first statement: from then until the process exits a stop signal
only sets a flag (never the default action, which kills the rank), whether it comes during start-up, in
the loop or after the final checkpoint. The trainer asks `StopRequest.agreed` before its first step (a
signal during start-up: exit EXIT_PREEMPTED with nothing to save) and at step boundaries (every `every`
steps: save, then exit EXIT_PREEMPTED); after the final checkpoint a signal changes nothing (exit 0).
The ranks all-reduce the flag (MAX) on a gloo group of CPU tensors: no GPU stream is synchronised, so
checking every step costs a few microseconds of host-side network latency. Inside `StopRequest.waiting()`
(the trainer's wait for its next batch) a stop signal also raises StopWaiting, so that a rank stuck on
data still stops (without a new checkpoint).

This module imports nothing heavy (no torch at import time): the trainer imports it before torch.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

EXIT_PREEMPTED = 85
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None  # the first stop signal this process got (a process-wide latch)
_waiting_pid: int | None = None  # the process inside StopRequest.waiting() (not forked loader workers)


class StopWaiting(Exception):
    """A stop signal arrived while the trainer was blocked in `StopRequest.waiting()`."""


def _record(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    if _waiting_pid == os.getpid():
        raise StopWaiting(signal.Signals(signum).name)


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

    def __init__(self, every: int = 1, signals=STOP_SIGNALS):
        self.every = every
        self._group = None
        catch_stop_signals(signals)
        shield_helpers(signals)

    @property
    def received(self) -> int | None:
        return _received

    def restore(self, signals=STOP_SIGNALS) -> None:
        """Default handlers again, the signal seen so far kept (in-process callers; see release_stop_signals)."""
        for s in signals:
            signal.signal(s, signal.SIG_DFL)

    @contextmanager
    def waiting(self):
        """A blocking wait (for data) that a stop signal cuts short with StopWaiting."""
        global _waiting_pid
        if _received is not None:
            raise StopWaiting(self.name)
        _waiting_pid = os.getpid()
        try:
            yield
        finally:
            _waiting_pid = None

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
    0 outside SLURM) wait at POINT (start, loop, step:N, save:N, done) until a stop signal has arrived, so a
    test signals at a known moment of the run (or lets the job's --time limit do it) without timing
    guesses; "R:POINT:hang:RANK" makes that rank stop itself there (SIGSTOP: a hung rank). Each rank
    prints a line when it starts waiting."""
    spec = os.environ.get("DITSCALE_TEST_PAUSE")
    if not spec:
        return
    restart = os.environ.get("SLURM_RESTART_COUNT") or "0"
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    items = spec.split(",")
    if f"{restart}:{point}:hang:{rank}" in items:
        print(f"[ditscale.train] rank {rank}: test pause at {point}: SIGSTOP (a hung rank)", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
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
