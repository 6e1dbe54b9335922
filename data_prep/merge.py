"""`python -m data_prep merge ROOT`: one index over all slices, and dataset.json (written last).

Refuses to merge unless every slice 0..N-1 is complete and all were written with the same settings
(format, resolution, VAE, input listing, slice count). MDS: streaming's merge_index over the slices'
index.json files (shard paths become `slice-…/shard…`); webdataset: wds_index.json lists every tar with
its sample count and hashes. Re-running merge after more slices finished is safe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

import numpy as np

from data_prep.encode import scale_from_stats
from data_prep.errors import DataPrepError
from data_prep.report import human_bytes, make_report, to_json
from ditscale.data.records import POSTERIOR
from ditscale.data.schema import (
    DATASET_JSON,
    MDS_INDEX,
    REPORT_JSON,
    SLICE_RE,
    SUMMARY_JSON,
    WDS_INDEX,
    data_format,
    slice_name,
)
from ditscale.data.storage import is_remote, join, local_path, read_bytes
from ditscale.files import atomic_write


def complete_slices(out: str) -> list[str]:
    """Names of the slices under `out` whose summary.json exists, sorted."""
    if not is_remote(out):
        root = local_path(out)
        if not os.path.isdir(root):
            raise DataPrepError(f"{out}: not a directory")
        return sorted(
            n for n in os.listdir(root) if SLICE_RE.match(n) and os.path.isfile(os.path.join(root, n, SUMMARY_JSON))
        )
    from streaming.base.storage.upload import CloudUploader

    keys = CloudUploader.get(out, exist_ok=True).list_objects() or []
    pattern = re.compile(r"(?:^|/)(slice-\d{5}-of-\d{5})/" + re.escape(SUMMARY_JSON) + "$")
    return sorted({m.group(1) for k in keys if (m := pattern.search(k))})


def _put(out: str, name: str, data: bytes) -> None:
    """Write root/name: atomically for local roots, by upload for remote ones."""
    if not is_remote(out):
        atomic_write(os.path.join(local_path(out), name), data)
        return
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory(prefix="data-prep-merge-") as tmp:
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
        CloudUploader.get((tmp, out), keep_local=True, exist_ok=True).upload_file(name)


def merge_mds(out: str, names: list[str]) -> None:
    """The "mds" format's merge: streaming's merge_index over the slices' index.json."""
    from streaming.base.util import merge_index

    if not is_remote(out):
        old = os.path.join(local_path(out), MDS_INDEX)
        if os.path.exists(old):
            os.remove(old)  # merge_index moves its result here and will not overwrite
        out = os.path.abspath(local_path(out))
    merge_index([join(out, n, MDS_INDEX) for n in names], out)


def merge_wds(out: str, names: list[str]) -> None:
    """The "wds" format's merge: one wds_index.json listing every slice's tars."""
    shards = []
    for n in names:
        for s in json.loads(read_bytes(join(out, n, WDS_INDEX)))["shards"]:
            shards.append({**s, "basename": f"{n}/{s['basename']}"})
    _put(out, WDS_INDEX, to_json({"version": 1, "shards": shards}))


def merge(out: str) -> dict[str, Any]:
    """Merge the slices under `out`; returns the dataset.json written."""
    names = complete_slices(out)
    if not names:
        raise DataPrepError(f"{out}: no complete slices (slice-*/summary.json); run encode first")
    summaries = [json.loads(read_bytes(join(out, n, SUMMARY_JSON))) for n in names]
    first = summaries[0]
    num_slices = first["settings"]["num_slices"]
    for n, s in zip(names, summaries):
        if s["settings"] != first["settings"]:
            diff = sorted(
                k
                for k in set(s["settings"]) | set(first["settings"])
                if s["settings"].get(k) != first["settings"].get(k)
            )
            raise DataPrepError(
                f"{join(out, n)} was written with other settings than {names[0]} "
                f"(differ in: {', '.join(diff)}); re-encode it with --overwrite"
            )
    missing = [slice_name(k, num_slices) for k in range(num_slices) if slice_name(k, num_slices) not in names]
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise DataPrepError(
            f"{out}: {len(missing)} of {num_slices} slices are not complete ({shown}); "
            f"rerun encode for them (complete slices are kept), then merge"
        )
    extra = [n for n in names if not n.endswith(f"-of-{num_slices:05d}")]
    if extra:
        raise DataPrepError(
            f"{out}: slices of another slicing are present ({', '.join(extra[:4])}); remove them or use another --out"
        )

    fmt = first["format"]
    data_format(fmt, f"{join(out, names[0], SUMMARY_JSON)}: 'format'").load("merge")(out, names)

    classes = first["classes"]
    if any(s["classes"] != classes for s in summaries):
        raise DataPrepError(f"{out}: slices disagree on the class names")
    max_label = max(s["max_label"] for s in summaries)
    if classes is None:
        classes = [str(i) for i in range(max_label + 1)]
    stats = [s["latent_stats"] for s in summaries]
    scale = scale_from_stats(stats) if first["scale_factor"] == "measure" else first["scale_factor"]
    count = sum(st["count"] for st in stats)
    mean = np.sum([st["sum"] for st in stats], 0) / max(count, 1)
    var = np.sum([st["sum_sq"] for st in stats], 0) / max(count, 1) - mean**2
    skipped, noted = [], []
    for n in names:
        report = json.loads(read_bytes(join(out, n, REPORT_JSON)))
        skipped += report["skipped_inputs"]
        noted += [(r["path"], r["note"]) for r in report.get("noted_inputs", [])]
    report = make_report("all", sum(s["inputs"] for s in summaries), [(r["path"], r["reason"]) for r in skipped], noted)
    _put(out, REPORT_JSON, to_json({k: v for k, v in report.items() if k != "slice"}))
    meta = {
        "format": fmt,
        "resolution": first["resolution"],
        "latent_channels": first["latent_channels"],
        "latent_size": first["latent_size"],
        "image_channels": first["image_channels"],
        "scale_factor": scale,
        "vae": first["vae"],
        "record": first.get("record", POSTERIOR),
        "classes": classes,
        "image": first.get("image"),
        "num_samples": sum(s["num_samples"] for s in summaries),
        "slices": [
            {
                "name": n,
                "num_samples": s["num_samples"],
                "skipped": s["skipped"],
                "shards": s["shards"],
                "bytes": s["bytes"],
            }
            for n, s in zip(names, summaries)
        ],
        "skipped": len(skipped),
        **report["noted"],
        "latent_stats": {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 0)).tolist()},
        "settings": first["settings"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _put(out, DATASET_JSON, to_json(meta))
    total_bytes = sum(s["bytes"] for s in summaries)
    print(
        f"data_prep merge: {out}: {len(names)} slices, {meta['num_samples']} samples, "
        f"{sum(s['shards'] for s in summaries)} shards, {human_bytes(total_bytes)}, "
        f"{len(skipped)} inputs skipped, "
        + "".join(f"{v} {k.replace('_', ' ')}, " for k, v in report["noted"].items())
        + f"scale_factor {scale} (report: {join(out, REPORT_JSON)})",
        file=sys.stderr,
    )
    return meta


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the dataset root given to encode --out")


def main(args: argparse.Namespace) -> int:
    merge(args.out)
    return 0
