"""Inception Score, precision / recall, and all metrics of a sample set against a reference.

- IS (Salimans et al.): exp(E_x KL(p(y|x) || p(y))) per split, mean and std over `splits` equal splits.
- Precision / recall (Kynkäänniemi et al. 2019, as in the ADM evaluator): each set's manifold is the union
  of balls around its points with radius = distance to the k-th nearest neighbour (k=3) in that set;
  precision = fraction of samples inside the reference manifold, recall = fraction of reference points
  inside the sample manifold. Distances are squared Euclidean, computed in blocks on the GPU when present.
"""
import numpy as np
import torch

from ditscale.evaluate.features import device_of, npz_features
from ditscale.evaluate.fid import feature_stats, frechet_distance

METRICS = ("fid", "sfid", "is", "pr")


#################################################################################
#                                Inception Score                                #
#################################################################################

def inception_score(logits, splits=10):
    """(mean, std) of the Inception Score of class logits (N, K) over `splits` equal splits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need logits (N ≥ splits={splits}, K), got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)                       # (N, K)
    n = len(log_p)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, 0) - np.log(len(part))      # log of the split's marginal p(y)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


#################################################################################
#                              Precision / recall                               #
#################################################################################

def _sq_dists(a, b):
    """Squared Euclidean distances (n, m) between rows of a (n, D) and b (m, D)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def manifold_radii(features, k=3, batch_size=10000):
    """Squared distance of each point (N, D) to its k-th nearest neighbour in the set (itself excluded)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r in range(0, n, batch_size):
        rows = features[r:r + batch_size]
        nearest = None                                             # (rows, k + 1) smallest so far
        for c in range(0, n, batch_size):
            d = _sq_dists(rows, features[c:c + batch_size])
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r:r + batch_size] = nearest[:, k]                    # index 0 is the point itself
    return radii


def within_manifold(queries, support, radii, batch_size=10000):
    """Boolean (Q,): whether each query lies in some ball (support[j], radii[j])."""
    inside = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    for q in range(0, len(queries), batch_size):
        for s in range(0, len(support), batch_size):
            d = _sq_dists(queries[q:q + batch_size], support[s:s + batch_size])
            inside[q:q + batch_size] |= (d <= radii[s:s + batch_size]).any(1)
    return inside


def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device=None):
    """(precision, recall) of samples (M, D) against reference features (N, D)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or fake.ndim != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"need features (N, D) and (M, D), got {tuple(ref.shape)} and {tuple(fake.shape)}")
    precision = within_manifold(fake, ref, manifold_radii(ref, k, batch_size), batch_size)
    recall = within_manifold(ref, fake, manifold_radii(fake, k, batch_size), batch_size)
    return precision.double().mean().item(), recall.double().mean().item()


#################################################################################
#                               All metrics                                     #
#################################################################################

def compute_metrics(features, reference, metrics=METRICS, k=3, splits=10, device=None):
    """Metrics of sample features {"pool", "spatial"?, "logits"?} against a Reference. Returns a dict of
    numbers; a requested metric that the inputs cannot give is listed under "skipped" with the reason."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    out, skipped = {"num_samples": len(features["pool"])}, {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(feature_stats(features["pool"]), reference.pool)
    if "sfid" in metrics:
        if reference.spatial is None or features.get("spatial") is None:
            skipped["sfid"] = "no spatial statistics in the " + (
                "reference (mu_s/sigma_s)" if reference.spatial is None else "feature network's output")
        else:
            out["sfid"] = frechet_distance(feature_stats(features["spatial"]), reference.spatial)
    if "is" in metrics:
        if features.get("logits") is None:
            skipped["is"] = "the feature network gives no logits"
        else:
            out["inception_score"], out["inception_score_std"] = inception_score(features["logits"], splits)
    if "pr" in metrics:
        if reference.pool_features is None:
            skipped["pr"] = "the reference has no images or pool features (only statistics)"
        else:
            out["precision"], out["recall"] = precision_recall(
                reference.pool_features, features["pool"], k=k, device=device)
    if skipped:
        out["skipped"] = skipped
    return out


def evaluate_npz(samples, reference, net, metrics=METRICS, batch_size=200, k=3, splits=10, progress=True):
    """Metrics of the images arr_0 of an ADM sample .npz against a Reference, with feature network `net`."""
    features = npz_features(net, samples, batch_size=batch_size, progress=progress)
    return compute_metrics(features, reference, metrics=metrics, k=k, splits=splits, device=device_of(net))
