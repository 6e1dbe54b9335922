"""Fréchet distance between Gaussians fitted to features: FID on pool_3, sFID on spatial features.

d² = |μ1 - μ2|² + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^½), with the matrix square root of scipy and the same
fallbacks as the TTUR / ADM evaluators (a small ridge when sqrtm is not finite, drop a negligible
imaginary part).
"""

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg


@dataclass(frozen=True)
class FIDStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        mu, sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"FID statistics need mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self):
        return self.mu.size


def feature_stats(features):
    """FIDStats of features (N, D); N ≥ 2."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features (N ≥ 2, D), got shape {x.shape}")
    return FIDStats(x.mean(0), np.atleast_2d(np.cov(x, rowvar=False)))


def frechet_distance(a: FIDStats, b: FIDStats, eps=1e-6):
    """Fréchet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim} (statistics from different networks?)")
    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm of the covariance product is singular; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(a.dim) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def fid_from_features(x, y):
    """FID between two feature sets (N, D) and (M, D)."""
    return frechet_distance(feature_stats(x), feature_stats(y))
