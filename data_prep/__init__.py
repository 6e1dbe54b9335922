"""Offline jobs: images → VAE posterior latents (image and mirror) → MDS / webdataset shards.

Command line: `python -m data_prep encode|merge|verify --help`. Python:

    from data_prep import make_dataset
    root = make_dataset("images/", "out/", resolution=32, vae="none")   # encode (1 worker) + merge
    # or step by step: encode.run(EncodeConfig(...)) per worker, merge.merge(out), verify.verify(out)
"""

from __future__ import annotations

from typing import Any


def make_dataset(
    input: str, out: str, *, resolution: int, vae: str = "none", format: str = "mds", **options: Any
) -> str:
    """Encode `input` in this process (all slices) and merge; returns `out`. options: EncodeConfig
    fields (num_slices, batch_size, decode_workers, scale_factor, image_channels, progress, …)."""
    from data_prep.encode import EncodeConfig, run
    from data_prep.merge import merge

    options.setdefault("progress", False)
    options.setdefault("worker", 0)
    options.setdefault("num_workers", 1)
    run(EncodeConfig(input=str(input), out=str(out), resolution=resolution, vae=vae, format=format, **options))
    merge(str(out))
    return str(out)
