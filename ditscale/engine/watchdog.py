"""Hung ranks found in minutes: a step-progress watchdog on every rank.

A rank that stops (a stuck kernel, a dead NIC, a SIGSTOP) leaves the others waiting in a collective
until its timeout (engine.dist_timeout_min, 30 minutes by default: long enough for start-up and for
checkpoint saves of the largest models). The watchdog bounds the steady state instead: when no step has
completed for `train.hang_timeout_min` minutes, it prints the rank's last step and every thread's stack
and exits the process with EXIT_HUNG. The other ranks follow (their own watchdogs, or srun's --wait), and
slurm/train_xl.sh requeues the job as a crash, to resume from the newest checkpoint.

Not watched, because they may legitimately take longer than a step: start-up up to the first completed
step (engine build, resume, compilation, warm-up) and whatever runs inside `paused(what)` (checkpoint
saves, sample grids, evaluation); there the collective timeout is the limit.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager

EXIT_HUNG = 5


class StepWatchdog:
    """`beat(step)` after every step; `paused(what)` around slow phases; `close()` at the end."""

    def __init__(self, timeout_min: float, rank: int, *, exit=os._exit, poll_s: float | None = None):
        self.timeout_s = timeout_min * 60.0
        self.rank = rank
        self._exit = exit
        self._last: float | None = None  # monotonic time of the last completed step (None: unarmed)
        self._step: int | None = None
        self._paused: str | None = None
        self._closed = threading.Event()
        self._thread = None
        if self.timeout_s > 0:
            poll = poll_s if poll_s is not None else min(5.0, self.timeout_s / 4)
            self._thread = threading.Thread(target=self._watch, args=(poll,), name="step-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self._step, self._last = step, time.monotonic()

    @contextmanager
    def paused(self, what: str):
        self._paused = what
        try:
            yield
        finally:
            self._paused = None
            if self._last is not None:
                self._last = time.monotonic()

    def close(self) -> None:
        self._closed.set()

    def _watch(self, poll: float) -> None:
        while not self._closed.wait(poll):
            last = self._last
            if last is None or self._paused is not None:
                continue
            idle = time.monotonic() - last
            if idle > self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        print(
            f"[ditscale.train] rank {self.rank}: error: no training step completed for {idle / 60:.1f} min "
            f"(last: step {self._step}; train.hang_timeout_min={self.timeout_s / 60:g}): this rank or another "
            f"is hung; its stacks follow; exiting with {EXIT_HUNG}",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        sys.stdout.flush()
        self._exit(EXIT_HUNG)
