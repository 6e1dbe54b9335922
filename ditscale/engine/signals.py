"""Preemption: SIGTERM / SIGUSR1 on any rank → every rank stops at the same step boundary.

The handler only sets a flag, except inside `waiting()` (the trainer's wait for its next batch), where it
raises StopWaiting so that a rank stuck on data still stops (without a new checkpoint). At a step boundary (every `every` steps) the ranks all-reduce it (MAX) so
they agree on the step at which to save and exit with EXIT_PREEMPTED. The all-reduce runs on a gloo
group of CPU tensors: no GPU stream is synchronised, so checking every step costs a few microseconds of
host-side network latency.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import torch

EXIT_PREEMPTED = 85
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def shield_helpers(signals) -> None:
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


class StopWaiting(Exception):
    """A stop signal arrived while the trainer was blocked in `StopRequest.waiting()`."""


class StopRequest:
    """Installs handlers for STOP_SIGNALS; `agreed(step)` is the collective decision."""

    def __init__(self, every: int = 1, signals=STOP_SIGNALS):
        self.every = every
        self.received: int | None = None
        self._group = None
        self._waiting, self._pid = False, os.getpid()
        shield_helpers(signals)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self._waiting and os.getpid() == self._pid:     # not in forked DataLoader workers
            raise StopWaiting(signal.Signals(signum).name)

    @contextmanager
    def waiting(self):
        """A blocking wait (for data) that a stop signal cuts short with StopWaiting."""
        if self.received is not None:
            raise StopWaiting(self.name)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _cpu_group(self):
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._group

    def agreed(self, step: int) -> bool:
        """True on every rank iff some rank got a stop signal (checked when step % every == 0)."""
        import torch.distributed as dist

        if step % self.every:
            return False
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group())
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
