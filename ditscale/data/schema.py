"""The dataset-on-disk format shared by `data_prep` (writer) and `ditscale.data` (readers).

One place names every file and column, so the two sides cannot drift apart:

    root/
      dataset.json                 metadata (validated by `validate_metadata`), written last by merge
      index.json | wds_index.json  MDS: streaming's merged index; wds: the shard list
      report.json                  every skipped input (path, reason) over all slices
      slice-00003-of-00008/        one worker's output; complete once summary.json exists
        shard.00000.mds.zstd …     (MDS) or shard-000000.tar … (webdataset)
        index.json | wds_index.json, report.json, summary.json (written last: the completion marker)

A record holds the posterior of the image and of its horizontal mirror (index 0 = image, 1 = mirror), or in
pixel mode the image's pixels (records.py; dataset.json's "record").

Formats are registered by name (`register_format`): what a format's index file is called and where its
reader (ditscale.data), slice writer, merge and shard check (data_prep) live. Adding a format is one
`register_format(DataFormat(...))`; everything that takes a format name looks it up with `data_format`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from ditscale.data.records import POSTERIOR, columns, record_kind

DATASET_JSON = "dataset.json"
SUMMARY_JSON = "summary.json"  # per slice; its presence marks the slice complete
REPORT_JSON = "report.json"
MDS_INDEX = "index.json"  # streaming's fixed name
WDS_INDEX = "wds_index.json"
HASHES = ["sha1", "xxh64"]  # sorted, as MDSWriter requires
SLICE_RE = re.compile(r"^slice-(\d{5})-of-(\d{5})$")


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFormat:
    """One shard format. Each role is "module:callable", imported when first used (so naming the formats
    imports neither streaming, webdataset nor data_prep):
    - reader(root, meta, *, batch_size, seed, shuffle, hflip, local, shuffle_buffer, image, **options)
      → a torch IterableDataset of reader items;
    - writer(SliceOutput, latent_channels, latent_size, shard_size, image column or None, record kind
      (records.py), `--compression` as given) → a slice writer (`write(arrays, label, key, image)`, arrays:
      records.py's columns of one record; `finish() -> shard entries`) that leaves `index` in the slice;
    - merge(root, slice names) → None: the root's `index` over all slices;
    - verify(root, shard entry, meta, records, rng) → (problems, records decoded) for one shard."""

    name: str
    index: str
    reader: str
    writer: str
    merge: str
    verify: str

    def load(self, role: str) -> Callable:
        module, attr = getattr(self, role).split(":")
        return getattr(importlib.import_module(module), attr)


FORMATS: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> DataFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"data format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def data_format(name: str, what: str = "data format") -> DataFormat:
    """The registered format `name`; ValueError naming `what` (a flag, a file's key) and the known ones."""
    if name not in FORMATS:
        raise ValueError(f"{what}: unknown data format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


register_format(
    DataFormat(
        "mds",
        MDS_INDEX,
        reader="ditscale.data.mds:open_dataset",
        writer="data_prep.writers:MdsSliceWriter",
        merge="data_prep.merge:merge_mds",
        verify="data_prep.verify:verify_mds_shard",
    )
)
register_format(
    DataFormat(
        "wds",
        WDS_INDEX,
        reader="ditscale.data.wds:open_dataset",
        writer="data_prep.writers:WdsSliceWriter",
        merge="data_prep.merge:merge_wds",
        verify="data_prep.verify:verify_wds_shard",
    )
)


# --------------------------------------------------------------------------------------------------
# Names and columns
# --------------------------------------------------------------------------------------------------


def slice_name(index: int, count: int) -> str:
    """`slice-00003-of-00008`: sorts in slice order and says how many slices to expect."""
    if not 0 <= index < count:
        raise ValueError(f"slice index {index} outside [0, {count})")
    return f"slice-{index:05d}-of-{count:05d}"


def mds_columns(latent_channels: int, latent_size: int, image: bool = False, record: str = POSTERIOR) -> dict[str, str]:
    """MDS column encodings: static shapes, so a record decodes without parsing headers. `record`: what a
    record holds (records.py); `image`: the optional encoded image column (image_column.py)."""
    from ditscale.data.image_column import MDS_ENCODING

    arrays = {
        name: f"ndarray:{dtype.name}:{','.join(map(str, shape))}"
        for name, (dtype, shape) in columns(record, latent_channels, latent_size).items()
    }
    return {**arrays, "label": "int", "key": "str", **({"image": MDS_ENCODING} if image else {})}


def wds_key(source_id: str) -> str:
    """A webdataset `__key__` for a source id: reversible, and free of the dots webdataset splits on."""
    return source_id.replace("%", "%25").replace(".", "%2E")


def source_id_of_wds_key(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "resolution": int,
    "latent_channels": int,
    "latent_size": int,
    "scale_factor": (int, float, list),
    "vae": str,
    "classes": list,
    "num_samples": int,
    "slices": list,
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
    data_format(meta["format"], f"{where}: 'format'")
    record_kind(meta, where)
    scale = meta["scale_factor"]
    if isinstance(scale, list) and len(scale) != meta["latent_channels"]:
        raise ValueError(
            f"{where}: 'scale_factor' has {len(scale)} entries for {meta['latent_channels']} latent channels"
        )
    if meta["num_samples"] < 0 or meta["latent_size"] < 1 or meta["latent_channels"] < 1:
        raise ValueError(f"{where}: non-positive sizes in num_samples/latent_size/latent_channels")
    if meta.get("image") is not None:
        from ditscale.data.image_column import ImageColumn

        try:
            ImageColumn.from_json(meta["image"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: key 'image' is not a valid image column ({e})") from None
    return meta
