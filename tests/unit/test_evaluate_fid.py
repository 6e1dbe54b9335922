"""Fréchet distance: against a direct numpy/scipy computation, zero on itself, growing with noise."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg

from ditscale.evaluate.fid import FIDStats, feature_stats, fid_from_features, frechet_distance


def direct_fid(x, y):
    """Textbook formula, written independently: |μx-μy|² + tr(Σx + Σy - 2 (Σx Σy)^½)."""
    mx, my = x.mean(0), y.mean(0)
    cx = (x - mx).T @ (x - mx) / (len(x) - 1)
    cy = (y - my).T @ (y - my) / (len(y) - 1)
    root = linalg.sqrtm(cx @ cy).real
    return float(np.sum((mx - my) ** 2) + np.trace(cx + cy - 2 * root))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 24), shift=st.floats(0, 3), scale=st.floats(0.2, 3))
def test_matches_direct_computation(seed, dim, shift, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, dim))
    y = rng.normal(size=(150, dim)) @ rng.normal(size=(dim, dim)) * scale + shift
    assert fid_from_features(x, y) == pytest.approx(direct_fid(x, y), rel=1e-6, abs=1e-8)


def test_gaussians_closed_form():
    """Two diagonal Gaussians: d² = |Δμ|² + Σ (σ1 - σ2)²."""
    a = FIDStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]))
    b = FIDStats(np.array([1.0, 2.0, 0.0]), np.diag([4.0, 4.0, 1.0]))
    assert frechet_distance(a, b) == pytest.approx(5.0 + 1.0 + 0.0 + 4.0)


def test_self_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 64)).astype(np.float32)
    assert abs(fid_from_features(x, x)) < 1e-6


def test_grows_monotonically_with_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 16)) @ rng.normal(size=(16, 16))
    fids = [fid_from_features(x, x + rng.normal(scale=s, size=x.shape)) for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert fids[0] < 1e-6
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_singular_covariances_fall_back_to_ridge():
    """Fewer samples than dimensions: rank-deficient covariances still give a finite, non-negative value."""
    rng = np.random.default_rng(2)
    d = fid_from_features(rng.normal(size=(5, 32)), rng.normal(size=(5, 32)))
    assert np.isfinite(d) and d > 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="feature dimensions differ: 4 vs 5"):
        frechet_distance(feature_stats(np.ones((3, 4)) + np.eye(3, 4)), feature_stats(np.eye(6, 5)))
    with pytest.raises(ValueError, match="mu \\(D,\\) and sigma \\(D, D\\)"):
        FIDStats(np.zeros(3), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="N ≥ 2"):
        feature_stats(np.zeros((1, 4)))
