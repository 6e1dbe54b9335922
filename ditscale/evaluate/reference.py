"""The reference side of the metrics: an ADM reference batch .npz, a saved reference, or real images.

ADM reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold `arr_0` (N, H, W, 3) uint8 images and
the precomputed statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial). As in ADM's evaluator
the file's statistics are used for FID / sFID when present (they may cover more images than arr_0, e.g.
the whole training set); arr_0 is run through the network only for precision / recall, or for the
statistics when the file has none. A folder of real images is centre-cropped to a resolution and reduced
to the same statistics; `save_reference` writes them (plus the pool features) for reuse.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditscale.evaluate.features import folder_features, list_images, npz_features
from ditscale.evaluate.fid import FIDStats, feature_stats
from ditscale.evaluate.inception import file_sha256


@dataclass
class Reference:
    pool: FIDStats  # FID statistics
    spatial: FIDStats | None = None  # sFID statistics
    pool_features: np.ndarray | None = None  # (N, D) float32, for precision / recall
    num_images: int | None = None  # images behind pool_features (None: statistics only)
    source: str = ""


def reference_from_features(features, source=""):
    """Reference of a feature dict {"pool", "spatial"?} (e.g. from real images)."""
    spatial = features.get("spatial")
    return Reference(
        pool=feature_stats(features["pool"]),
        spatial=None if spatial is None else feature_stats(spatial),
        pool_features=features["pool"],
        num_images=len(features["pool"]),
        source=str(source),
    )


def _stats(data, mu_key, sigma_key, path):
    if mu_key not in data:
        return None
    if sigma_key not in data:
        raise ValueError(f"{path}: has {mu_key!r} but no {sigma_key!r}")
    try:
        return FIDStats(data[mu_key], data[sigma_key])
    except ValueError as e:
        raise ValueError(f"{path}: {mu_key}/{sigma_key}: {e}") from e


def load_reference(path, net=None, with_features=True, resolution=None, batch_size=200, workers=4, progress=True):
    """Reference from an .npz (ADM reference batch or save_reference output) or a folder of images.
    `net` computes what the file does not hold: statistics of arr_0 / the folder, and with_features=True
    also the pool features of arr_0 for precision / recall. `resolution` is for folders only."""
    path = Path(path)
    if path.is_dir():
        if net is None or resolution is None:
            raise ValueError(f"{path}: a folder of images needs the feature network and a resolution")
        return reference_from_features(
            folder_features(net, path, resolution, batch_size, workers, progress), source=path
        )
    if not path.is_file():
        raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz or a folder of images)")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive (np.savez), got a single array")
    with data:
        pool, spatial = _stats(data, "mu", "sigma", path), _stats(data, "mu_s", "sigma_s", path)
        feats = np.asarray(data["pool_features"], np.float32) if "pool_features" in data else None
        has_images = "arr_0" in data.files
    if pool is None and not has_images:
        raise ValueError(f"{path}: needs images 'arr_0' or statistics 'mu'/'sigma'; has {data.files}")
    if has_images and (pool is None or (with_features and feats is None)):
        if net is None:
            raise ValueError(f"{path}: computing from arr_0 needs the feature network")
        computed = reference_from_features(npz_features(net, path, batch_size, progress), source=path)
        pool = computed.pool if pool is None else pool
        spatial = computed.spatial if spatial is None else spatial
        feats = computed.pool_features
    return Reference(
        pool=pool,
        spatial=spatial,
        pool_features=feats,
        num_images=None if feats is None else len(feats),
        source=str(path),
    )


def save_reference(ref, path, meta=None):
    """Write a Reference as an .npz that load_reference reads back (ADM's key names for the statistics)."""
    arrays = {"mu": ref.pool.mu, "sigma": ref.pool.sigma}
    if ref.spatial is not None:
        arrays.update(mu_s=ref.spatial.mu, sigma_s=ref.spatial.sigma)
    if ref.pool_features is not None:
        arrays["pool_features"] = np.asarray(ref.pool_features, np.float32)
    arrays["meta"] = np.array(json.dumps({"source": ref.source, "num_images": ref.num_images, **(meta or {})}))
    np.savez(path, **arrays)


def reference_sha256(path) -> str:
    """sha256 of a reference file; for a folder of images, of its listing (relative paths and sizes)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in list_images(path):
        h.update(f"{f.relative_to(path).as_posix()}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()
