"""Readers of data_prep's shards (MDS through mosaicml-streaming, or webdataset tars).

    meta = read_metadata(root)                          # dataset.json, validated
    ds = build_dataset(root, batch_size=256, seed=0)    # format from dataset.json
    loader = build_dataloader(ds, batch_size=256, num_workers=2)
    for batch in loader:                                # mean/logvar (B, C, h, w) fp16, label/index (B,)
        x = sample_latents(batch["mean"].cuda(), batch["logvar"].cuda(), meta["scale_factor"], gen)

Items carry one flip of the stored posterior, chosen by `flip.flip_of(seed, epoch, index)`; the latent
itself is drawn on the trainer's device (`posterior.sample_latents`).
"""

from __future__ import annotations

import json
from typing import Any

from ditscale.data.flip import flip_of
from ditscale.data.image_column import image_column_of
from ditscale.data.integrity import DataError
from ditscale.data.posterior import sample_latents
from ditscale.data.schema import DATASET_JSON, data_format, validate_metadata
from ditscale.data.storage import join, read_bytes
from ditscale.data.streaming_zoo import defer as _defer_streaming_zoo

_defer_streaming_zoo()  # before anything imports streaming: its dataset zoo costs seconds per command
__all__ = ["read_metadata", "build_dataset", "build_dataloader", "sample_latents", "flip_of", "DataError"]


def _root(path: str, split: str | None) -> str:
    path = str(path)
    return join(path, split) if split else path


def read_metadata(path: str, split: str | None = None) -> dict:
    """The dataset's dataset.json (local path or remote URL), validated."""
    where = join(_root(path, split), DATASET_JSON)
    try:
        raw = read_bytes(where)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{where} not found: not a data_prep dataset, or its slices were never merged "
            f"(python -m data_prep merge {_root(path, split)})"
        ) from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    return validate_metadata(meta, where)


def build_dataset(
    path: str,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    split: str | None = None,
    local: str | None = None,
    format: str | None = None,
    shuffle_buffer: int = 2000,
    hflip: bool = True,
    with_image: bool = False,
    remote_wait_s: float = 600.0,
    **streaming_kwargs: Any,
):
    """A torch IterableDataset of reader items over the dataset at `path` (local or remote).

    batch_size: per-rank batch size, as given to the DataLoader (streaming partitions by it).
    seed: shuffle order and flips. hflip: False always gives the image as stored, never its mirror
    (for data whose mirror is not a valid sample: digits, text). with_image: items also carry "image", the
    kept crop of the same flip, (C, H, W) uint8 (ValueError when the dataset keeps none); off, the
    image column is never read. local: MDS cache directory (default `cache.content_cache_dir`, keyed by the index's content; must
    be unique per live dataset in a process; `local=path` reads a local dataset in place, decompressing
    its shards next to them). format: checked against dataset.json when given. streaming_kwargs go to
    StreamingDataset (predownload, cache_limit, num_canonical_nodes, epoch_size, ...); the webdataset
    reader takes shuffle_buffer instead. remote_wait_s: how long a shard fetch waits for an unreachable
    object store before it fails naming the endpoint. The dataset has `.metadata` (dataset.json).
    """
    root = _root(path, split)
    meta = read_metadata(root)
    if format is not None and format != meta["format"]:
        raise ValueError(f"{root}: dataset.json says format '{meta['format']}', asked for '{format}'")
    image = image_column_of(meta, join(root, DATASET_JSON)) if with_image else None
    reader = data_format(meta["format"]).load("reader")
    return reader(
        root,
        meta,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        hflip=hflip,
        local=local,
        shuffle_buffer=shuffle_buffer,
        image=image,
        remote_wait_s=remote_wait_s,
        **streaming_kwargs,
    )


def build_dataloader(
    dataset, *, batch_size: int, num_workers: int = 2, drop_last: bool = True, pin_memory: bool = False, **kwargs: Any
):
    """A LatentDataLoader (resumable via state_dict/load_state_dict) over a build_dataset dataset."""
    from ditscale.data.loader import LatentDataLoader
    from ditscale.data.wds import LatentWdsDataset

    if isinstance(dataset, LatentWdsDataset) and kwargs.get("persistent_workers"):
        raise ValueError("persistent_workers would freeze the webdataset reader's epoch; leave it off")
    return LatentDataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory, **kwargs
    )
