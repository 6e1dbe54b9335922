"""The dataset-on-disk format shared by `data_prep` (writer) and `ditscale.data` (readers).

One place names every file and column, so the two sides cannot drift apart:

    root/
      dataset.json                 metadata (validated by `validate_metadata`), written last by merge
      index.json | wds_index.json  MDS: streaming's merged index; wds: the shard list
      report.json                  every skipped input (path, reason) over all slices
      slice-00003-of-00008/        one worker's output; complete once summary.json exists
        shard.00000.mds.zstd …     (MDS) or shard-000000.tar … (webdataset)
        index.json | wds_index.json, report.json, summary.json (written last: the completion marker)

A record holds the posterior of the image and of its horizontal mirror (index 0 = image, 1 = mirror).
"""
from __future__ import annotations

import re
from typing import Any

DATASET_JSON = "dataset.json"
SUMMARY_JSON = "summary.json"   # per slice; its presence marks the slice complete
REPORT_JSON = "report.json"
MDS_INDEX = "index.json"        # streaming's fixed name
WDS_INDEX = "wds_index.json"
FORMATS = ("mds", "wds")
HASHES = ["sha1", "xxh64"]      # sorted, as MDSWriter requires
SLICE_RE = re.compile(r"^slice-(\d{5})-of-(\d{5})$")
WDS_FIELDS = ("mean.npy", "logvar.npy", "cls")


def slice_name(index: int, count: int) -> str:
    """`slice-00003-of-00008`: sorts in slice order and says how many slices to expect."""
    if not 0 <= index < count:
        raise ValueError(f"slice index {index} outside [0, {count})")
    return f"slice-{index:05d}-of-{count:05d}"


def mds_columns(latent_channels: int, latent_size: int, image: bool = False) -> dict[str, str]:
    """MDS column encodings: static shapes, so a record decodes without parsing headers. `image`: the
    optional encoded image column (image_column.py)."""
    from ditscale.data.image_column import MDS_ENCODING

    shape = f"2,{latent_channels},{latent_size},{latent_size}"
    return {"mean": f"ndarray:float16:{shape}", "logvar": f"ndarray:float16:{shape}",
            "label": "int", "key": "str", **({"image": MDS_ENCODING} if image else {})}


def wds_key(source_id: str) -> str:
    """A webdataset `__key__` for a source id: reversible, and free of the dots webdataset splits on."""
    return source_id.replace("%", "%25").replace(".", "%2E")


def source_id_of_wds_key(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "resolution": int, "latent_channels": int, "latent_size": int,
    "scale_factor": (int, float, list), "vae": str, "classes": list, "num_samples": int, "slices": list,
}


def validate_metadata(meta: Any, where: str) -> dict:
    """Check a dataset.json object; raise ValueError naming the file and the key at fault."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in meta:
            raise ValueError(f"{where}: missing key '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ValueError(f"{where}: key '{key}' has type {type(meta[key]).__name__}")
    if meta["format"] not in FORMATS:
        raise ValueError(f"{where}: 'format' is {meta['format']!r}, expected one of {FORMATS}")
    scale = meta["scale_factor"]
    if isinstance(scale, list) and len(scale) != meta["latent_channels"]:
        raise ValueError(f"{where}: 'scale_factor' has {len(scale)} entries for "
                         f"{meta['latent_channels']} latent channels")
    if meta["num_samples"] < 0 or meta["latent_size"] < 1 or meta["latent_channels"] < 1:
        raise ValueError(f"{where}: non-positive sizes in num_samples/latent_size/latent_channels")
    if meta.get("image") is not None:
        from ditscale.data.image_column import ImageColumn

        try:
            ImageColumn.from_json(meta["image"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: key 'image' is not a valid image column ({e})") from None
    return meta
