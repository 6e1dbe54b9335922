"""Loader → device overlap: the next batch's host → device copy runs while the current step computes.

    batches = DevicePrefetcher(loader, device)     # endless; batches arrive on `device`
    batch = next(batches)
    client_state = {"loader": batches.state_dict()}

On CUDA the prefetcher keeps one batch ahead: as it hands out batch n it queues the copy of batch n+1
(pinned by the loader) on a side stream, so the copy runs under step n's kernels; the compute stream
waits for a batch's copy only when the batch is handed out. Elsewhere batches pass through as they come
(there is no copy to hide). `host_keys` stay on the host: the dataset indices, which the metrics sum
without touching the device.

Resume: the batch held ahead was taken from the loader but not trained on; `state_dict()` counts it as
unseen, so a checkpoint resumes at the first batch the trainer did not see.
"""

from __future__ import annotations

from typing import Iterator

import torch


def endless(loader) -> Iterator[dict]:
    """Batches across epoch ends (the loader's state_dict knows the epoch and position). The rest of an
    epoch resumed after its last full batch (a checkpoint at an epoch's end) gives no batch and is passed;
    two epochs in a row without a batch, so one read from its start, raise DataError instead of looping
    forever."""
    from ditscale.data import DataError

    empty = 0
    while True:
        got = 0
        for got, batch in enumerate(loader, 1):
            yield batch
        empty = 0 if got else empty + 1
        if empty == 2:
            raise DataError(
                f"an epoch of {loader.dataset.metadata['num_samples']} samples gave this rank no "
                f"batch of {loader.batch_size} (drop_last; {loader.num_workers} workers)"
            )


class DevicePrefetcher:
    """Batches of `loader` (dicts of tensors) on `device`. ahead: keep one batch in flight (default: on
    CUDA); stream: the side stream for the copies (default: a new one on CUDA, none elsewhere)."""

    def __init__(
        self,
        loader,
        device: torch.device,
        *,
        ahead: bool | None = None,
        stream=None,
        host_keys: tuple[str, ...] = ("index",),
    ):
        self.loader, self.device, self.host_keys = loader, torch.device(device), host_keys
        self.ahead = self.device.type == "cuda" if ahead is None else ahead
        if stream is None and self.ahead and self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
        self.stream = stream
        self.batches = endless(loader)
        self.held: dict | None = None

    def __iter__(self):
        return self

    def _copy(self, batch: dict) -> dict:
        def move(key, value):
            if key in self.host_keys or not isinstance(value, torch.Tensor):
                return value
            return value.to(self.device, non_blocking=True)

        if self.stream is None:
            return {k: move(k, v) for k, v in batch.items()}
        with torch.cuda.stream(self.stream):
            return {k: move(k, v) for k, v in batch.items()}

    def _hand_out(self, batch: dict) -> dict:
        """The compute stream waits for the batch's copy, and keeps its memory alive until it is used."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for key, value in batch.items():
                if key not in self.host_keys and isinstance(value, torch.Tensor):
                    value.record_stream(current)
        return batch

    def __next__(self) -> dict:
        if not self.ahead:
            return self._copy(next(self.batches))
        batch = self.held if self.held is not None else self._copy(next(self.batches))
        self.held = None
        batch = self._hand_out(batch)
        self.held = self._copy(next(self.batches))  # overlaps the step that uses `batch`
        return batch

    def state_dict(self):
        """The loader's position after the last batch handed out (the one held ahead counts as unseen)."""
        held = 0 if self.held is None else len(next(iter(self.held.values())))
        return self.loader.state_dict(held=held)
