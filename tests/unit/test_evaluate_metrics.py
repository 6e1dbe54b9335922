"""Inception Score and k-NN precision / recall against their definitions and independent references."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from ditscale.evaluate.fid import feature_stats
from ditscale.evaluate.metrics import MetricSettings, compute_metrics, inception_score, manifold_radii, precision_recall
from ditscale.evaluate.reference import Reference

# --------------------------------------------------------------------------- Inception Score


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 10, 37])
def test_confident_balanced_predictions_score_number_of_classes(classes):
    labels = np.tile(np.arange(classes), 10)  # every split sees every class once
    logits = np.full((len(labels), classes), -1e4)
    logits[np.arange(len(labels)), labels] = 0.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-9) and std < 1e-9


def test_matches_improved_gan_formula():
    """The original formula on probabilities, per split, exp(mean KL(p(y|x) || p(y)))."""
    logits = np.random.default_rng(0).normal(scale=3, size=(1000, 20))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 10):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)


def test_too_few_images_for_the_splits():
    with pytest.raises(ValueError, match="splits=10"):
        inception_score(np.zeros((5, 3)), splits=10)


# --------------------------------------------------------------------------- precision / recall


def test_radii_match_sklearn_knn():
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    dist, _ = NearestNeighbors(n_neighbors=4).fit(x).kneighbors(x)  # column 0 is the point itself
    for batch in (7, 64, 10000):  # blocked == unblocked
        radii = manifold_radii(torch.from_numpy(x), k=3, batch_size=batch, distances="fp32").numpy()
        np.testing.assert_allclose(np.sqrt(radii), dist[:, 3], rtol=1e-4)


def brute_precision_recall(ref, fake, k=3):
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    r_ref = np.sort(d(ref, ref), 1)[:, k]
    r_fake = np.sort(d(fake, fake), 1)[:, k]
    precision = (d(fake, ref) <= r_ref[None]).any(1).mean()
    recall = (d(ref, fake) <= r_fake[None]).any(1).mean()
    return precision, recall


def test_identical_sets_score_one():
    x = np.random.default_rng(2).normal(size=(200, 16))
    assert precision_recall(x, x.copy(), device="cpu") == (1.0, 1.0)


def test_disjoint_sets_score_zero():
    rng = np.random.default_rng(3)
    ref, fake = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) + 50
    assert precision_recall(ref, fake, device="cpu") == (0.0, 0.0)


def test_collapse_keeps_precision_loses_recall():
    """Samples covering one mode of two: precise but half the reference is missed."""
    rng = np.random.default_rng(4)
    ref = np.concatenate([rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 20])
    fake = rng.normal(size=(200, 4))
    precision, recall = precision_recall(ref, fake, device="cpu")
    assert precision > 0.9 and 0.4 < recall < 0.55


def test_matches_brute_force_with_blocks():
    rng = np.random.default_rng(5)
    ref, fake = rng.normal(size=(120, 6)), rng.normal(size=(90, 6)) * 1.3 + 0.4
    got = precision_recall(ref, fake, batch_size=17, device="cpu", distances="fp32")
    assert got == pytest.approx(brute_precision_recall(ref, fake), abs=1e-12)


# --------------------------------------------------------------------------- all together


def test_compute_metrics_reports_what_it_cannot_compute():
    rng = np.random.default_rng(6)
    feats = {"pool": rng.normal(size=(50, 8)), "logits": rng.normal(size=(50, 5))}
    ref = Reference(pool=feature_stats(rng.normal(size=(60, 8))))  # statistics only, no spatial
    out = compute_metrics(feats, ref, device="cpu")
    assert out["fid"] > 0 and out["inception_score"] > 1 and out["num_samples"] == 50
    assert set(out["skipped"]) == {"sfid", "pr"} and "mu_s" in out["skipped"]["sfid"]
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(feats, ref, MetricSettings(metrics=("fid", "kid")))
