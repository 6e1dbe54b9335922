"""`python -m data_prep verify ROOT`: is every shard intact and does it hold what the index says?

For each shard of the merged index: size and every recorded hash of the stored file, for MDS the
decompressed data's hashes and sample count too, for webdataset the samples counted in the tar; then a
few records per shard are decoded and checked (shapes, dtypes, finite values, label range, key).
Finally the sample counts are summed against dataset.json. Problems name the shard; exit status 1.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ditscale.data import read_metadata
from ditscale.data.image_column import ImageColumn
from ditscale.data.integrity import shard_problems
from ditscale.data.records import as_posterior, columns, record_kind
from ditscale.data.schema import data_format
from ditscale.data.storage import join, read_bytes
from ditscale.data.tario import tar_samples


@dataclass
class VerifyResult:
    shards: int = 0
    samples: int = 0
    decoded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_record(name: str, rec: dict[str, Any], meta: dict) -> list[str]:
    """Shape, dtype, values and label of one decoded record (of either kind: records.py)."""
    shape = (2, meta["latent_channels"], meta["latent_size"], meta["latent_size"])
    try:
        rec = as_posterior(rec, record_kind(meta), meta["latent_channels"], meta["latent_size"])
    except ValueError as e:
        return [f"{name}: record {rec['key']!r}: {e}"]
    problems = []
    for col in ("mean", "logvar"):
        a = rec[col]
        if a.dtype != np.float16 or a.shape != shape:
            problems.append(f"{name}: record {rec['key']!r}: {col} is {a.dtype}{a.shape}, expected float16{shape}")
            return problems
    if not np.isfinite(rec["mean"]).all():
        problems.append(f"{name}: record {rec['key']!r}: mean has non-finite values")
    logvar = rec["logvar"]
    pixel = meta["vae"] == "none"
    if (pixel and not np.isneginf(logvar).all()) or (not pixel and not np.isfinite(logvar).all()):
        problems.append(
            f"{name}: record {rec['key']!r}: logvar should be {'-inf everywhere (pixel mode)' if pixel else 'finite'}"
        )
    if not 0 <= rec["label"] < len(meta["classes"]):
        problems.append(f"{name}: record {rec['key']!r}: label {rec['label']} outside [0, {len(meta['classes'])})")
    if not rec["key"]:
        problems.append(f"{name}: a record has an empty key")
    return problems + _check_image(name, rec, meta)


def _check_image(name: str, rec: dict[str, Any], meta: dict) -> list[str]:
    """The kept image (dataset.json "image"), when the dataset has one: present, decodable, right size."""
    column = ImageColumn.from_json(meta.get("image"))
    if column is None:
        return []
    if rec.get("image") is None:
        return [f"{name}: record {rec['key']!r}: no image, dataset.json says the shards keep {column.codec} images"]
    try:
        column.decode(rec["image"])
    except Exception as e:  # a damaged or foreign file
        return [f"{name}: record {rec['key']!r}: image does not decode ({type(e).__name__}: {e})"]
    return []


def _wds_image(members: dict[str, bytes], meta: dict) -> bytes | None:
    column = ImageColumn.from_json(meta.get("image"))
    return members.get(column.wds_field) if column is not None else None


def _pick(n: int, k: int, rng: random.Random) -> list[int]:
    """First, last and random record positions: k in all (fewer for small shards)."""
    if n <= k:
        return list(range(n))
    return sorted({0, n - 1, *rng.sample(range(1, n - 1), max(0, k - 2))})


def verify_mds_shard(root: str, shard: dict, meta: dict, k: int, rng: random.Random) -> tuple[list[str], int]:
    """The "mds" format's check of one shard (see the module docstring): (problems, records decoded)."""
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader

    stored = shard["zip_data"] or shard["raw_data"]
    name = stored["basename"]
    try:
        data = read_bytes(join(root, name))
    except FileNotFoundError:
        return [f"{name}: missing"], 0
    problems = shard_problems(data, stored, f"{name}: file")
    if shard["zip_data"]:
        try:
            data = decompress(shard["compression"], data)
        except Exception as e:  # a damaged compressed stream
            return problems + [f"{name}: cannot decompress ({type(e).__name__}: {e})"], 0
        problems += shard_problems(data, shard["raw_data"], f"{name}: decompressed data")
    if problems:
        return problems, 0
    count = int(np.frombuffer(data, np.uint32, 1, 0)[0])
    if count != shard["samples"]:
        return [f"{name}: holds {count} samples, the index says {shard['samples']}"], 0
    reader = MDSReader.from_json(root, None, shard)
    offsets = np.frombuffer(data, np.uint32, count + 1, 4)
    decoded = 0
    for i in _pick(count, k, rng):
        try:
            rec = reader.decode_sample(data[offsets[i] : offsets[i + 1]])
        except Exception as e:
            problems.append(f"{name}: record {i} does not decode ({type(e).__name__}: {e})")
            continue
        problems += check_record(name, rec, meta)
        decoded += 1
    return problems, decoded


def verify_wds_shard(root: str, shard: dict, meta: dict, k: int, rng: random.Random) -> tuple[list[str], int]:
    """The "wds" format's check of one shard (see the module docstring): (problems, records decoded)."""
    name = shard["basename"]
    try:
        data = read_bytes(join(root, name))
    except FileNotFoundError:
        return [f"{name}: missing"], 0
    problems = shard_problems(data, shard, f"{name}: file")
    if problems:
        return problems, 0
    try:
        samples = list(tar_samples(io.BytesIO(data)))
    except Exception as e:
        return [f"{name}: unreadable tar ({type(e).__name__}: {e})"], 0
    if len(samples) != shard["samples"]:
        return [f"{name}: holds {len(samples)} samples, the index says {shard['samples']}"], 0
    decoded = 0
    array_columns = columns(record_kind(meta), meta["latent_channels"], meta["latent_size"])
    for i in _pick(len(samples), k, rng):
        key, members = samples[i]
        try:
            rec = {
                "key": key,
                "label": int(members["cls"].decode()),
                "image": _wds_image(members, meta),
                **{c: np.load(io.BytesIO(members[f"{c}.npy"]), allow_pickle=False) for c in array_columns},
            }
        except Exception as e:
            problems.append(f"{name}: sample {key!r} does not decode ({type(e).__name__}: {e})")
            continue
        problems += check_record(name, rec, meta)
        decoded += 1
    return problems, decoded


def verify(
    root: str, *, records_per_shard: int = 4, seed: int = 0, threads: int = 8, progress: bool = False
) -> VerifyResult:
    """Check the merged dataset at `root` (local or remote); see the module docstring."""
    from tqdm import tqdm

    result = VerifyResult()
    try:
        meta = read_metadata(root)
    except (FileNotFoundError, ValueError) as e:
        result.problems.append(str(e))
        return result
    fmt = data_format(meta["format"])
    index_name = fmt.index
    try:
        shards = json.loads(read_bytes(join(root, index_name)))["shards"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        result.problems.append(f"{join(root, index_name)}: unreadable ({e})")
        return result
    check = fmt.load("verify")
    rngs = [random.Random(f"{seed}/{i}") for i in range(len(shards))]
    with ThreadPoolExecutor(threads) as pool:
        jobs = pool.map(lambda a: check(root, a[0], meta, records_per_shard, a[1]), zip(shards, rngs))
        for problems, decoded in tqdm(jobs, total=len(shards), unit="shard", disable=not progress, file=sys.stderr):
            result.problems += problems
            result.decoded += decoded
    result.shards = len(shards)
    result.samples = sum(s["samples"] for s in shards)
    if result.samples != meta["num_samples"]:
        result.problems.append(
            f"{join(root, index_name)}: {result.samples} samples in the index, dataset.json says {meta['num_samples']}"
        )
    per_slice = {s["name"]: s["num_samples"] for s in meta["slices"]}
    if sum(per_slice.values()) != meta["num_samples"]:
        result.problems.append(
            f"{root}: dataset.json's slices add up to {sum(per_slice.values())} samples, not {meta['num_samples']}"
        )
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="merged dataset root (local or remote)")
    p.add_argument("--records-per-shard", type=int, default=4, help="records decoded and checked per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=8)


def main(args: argparse.Namespace) -> int:
    result = verify(
        args.root, records_per_shard=args.records_per_shard, seed=args.seed, threads=args.threads, progress=True
    )
    for problem in result.problems:
        print(f"data_prep verify: {problem}", file=sys.stderr)
    status = "OK" if result.ok else f"FAILED ({len(result.problems)} problems)"
    print(
        f"data_prep verify: {args.root}: {status}: {result.shards} shards, {result.samples} samples, "
        f"{result.decoded} records decoded",
        file=sys.stderr,
    )
    return 0 if result.ok else 1
