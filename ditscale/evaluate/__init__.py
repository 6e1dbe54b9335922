"""FID, sFID, Inception Score and precision / recall, in PyTorch, from local Inception weights."""

from ditscale.evaluate.features import extract_features, folder_features, iter_npz_batches, npz_features
from ditscale.evaluate.fid import FIDStats, feature_stats, fid_from_features, frechet_distance
from ditscale.evaluate.inception import WEIGHTS_FILENAME, WEIGHTS_URL, FIDInceptionV3, load_inception
from ditscale.evaluate.metrics import (
    METRICS,
    MetricSettings,
    compute_metrics,
    evaluate_npz,
    inception_score,
    precision_recall,
)
from ditscale.evaluate.reference import (
    Reference,
    load_reference,
    reference_from_features,
    reference_sha256,
    save_reference,
)
from ditscale.evaluate.tiny import TinyFeatureNet

__all__ = [
    "METRICS",
    "WEIGHTS_FILENAME",
    "WEIGHTS_URL",
    "FIDInceptionV3",
    "FIDStats",
    "MetricSettings",
    "Reference",
    "TinyFeatureNet",
    "compute_metrics",
    "evaluate_npz",
    "extract_features",
    "feature_stats",
    "fid_from_features",
    "folder_features",
    "frechet_distance",
    "inception_score",
    "iter_npz_batches",
    "load_inception",
    "load_reference",
    "npz_features",
    "precision_recall",
    "reference_from_features",
    "reference_sha256",
    "save_reference",
]
