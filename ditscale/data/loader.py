"""A DataLoader that checkpoints either reader: StreamingDataLoader's sample counting, for MDS and wds."""

from __future__ import annotations

from typing import Any, Iterator

from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.world import World


class LatentDataLoader(StreamingDataLoader):
    """`state_dict()` / `load_state_dict()` for resume, whatever the dataset's format.

    The state counts the samples this loader has handed to the trainer (over all ranks), not those
    prefetched by workers, so saving it next to the model checkpoint resumes at the next unseen batch.
    """

    def __iter__(self) -> Iterator[Any]:
        begin = getattr(self.dataset, "begin_epoch", None)
        if begin is not None:
            begin(self.batch_size, self.drop_last)
        try:
            yield from super().__iter__()
        finally:
            end = getattr(self.dataset, "end_epoch", None)
            if end is not None:
                end()

    def state_dict(self, held: int = 0) -> dict[str, Any] | None:
        """held: samples handed out but not trained on yet (a prefetcher's lookahead), counted as unseen."""
        self.num_samples_yielded -= held
        try:
            if isinstance(self.dataset, StreamingDataset):
                return super().state_dict()
            return self.dataset.state_dict(self.num_samples_yielded * World.detect().num_ranks, False)
        finally:
            self.num_samples_yielded += held

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        self.dataset.load_state_dict(obj)
