"""Noticing non-finite steps, and what it costs in host synchronisations (engine.nonfinite_check).

- "step" (default): DeepSpeed's bf16 overflow check (bf16.check_grad_overflow) reads the gradients'
  finiteness every step and skips a bad step, so the weights never take one and an occasional bf16 spike
  costs one skipped step; on ZeRO-1/2 that is two host syncs per step (the local flag, then the
  all-reduced one), which keep the host from queueing the next step while the device works. fp32 configs
  have no such check: non-finite losses are counted on the device and read at each log and save.
- "async": DeepSpeed's check is off. Non-finite losses (and gradient norms) are counted on the device;
  each step's count is copied to host memory without blocking and read one step later, when the device
  has long finished it: no step waits for its own kernels. A non-finite step reaches the weights, the run
  stops at the next step (exit 3) without saving it, and restarts from its last checkpoint, which holds
  no such step (a blocking read precedes every save). Use it where bad steps are rare (the fp32 master
  weights and bf16 activations of DiT training) and throughput matters.
"""

from __future__ import annotations

import torch


class NonfiniteWatch:
    """Reads a device counter of non-finite values (e.g. Metrics.nonfinite), summed over the ranks.

    `drain()` is the blocking read (log / save time); `poll()` (async mode, every step) returns the count
    as of the previous poll without waiting for the device: two host buffers take turns receiving the
    count, and a buffer is read one step after its copy was queued. Every rank reads the same step's
    count, so all ranks decide to stop at the same step."""

    def __init__(self, counter: torch.Tensor, world_size: int, *, every_step: bool = False):
        self.counter, self.world, self.every_step = counter, world_size, every_step
        cuda = counter.device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.int64, pin_memory=cuda)
        self.host_view = self.host.numpy()  # reads that go through numpy: no tensor op, no sync
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.turn = 0
        self.pending = False

    def _summed(self) -> torch.Tensor:
        import torch.distributed as dist

        total = self.counter.clone()
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(total)  # queued on the device's stream (NCCL): no host wait
        return total

    def check(self, *, saving: bool, logging: bool) -> int:
        """What a step acts on: a blocking read before a save, and at a log unless polling every step;
        otherwise the previous step's count (every_step) or nothing."""
        if saving or (logging and not self.every_step):
            return self.drain()
        return self.poll() if self.every_step else 0

    def poll(self) -> int:
        """Non-finite values counted on all ranks up to the previous poll (0 at the first)."""
        slot, previous = self.turn, 1 - self.turn
        self.host[slot].copy_(self._summed(), non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        self.turn = previous
        if not self.pending:
            self.pending = True
            return 0
        if self.events[previous] is not None:
            self.events[previous].synchronize()  # the previous step's copy: long done on the device
        return int(self.host_view[previous])

    def drain(self) -> int:
        """All non-finite values counted on all ranks until now (a host sync); resets the count."""
        bad = int(self._summed())
        self.counter.zero_()
        self.pending = False
        return bad
