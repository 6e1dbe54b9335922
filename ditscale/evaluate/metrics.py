"""Inception Score, precision / recall, and all metrics of a sample set against a reference.

The defaults are those of ADM's evaluator (guided-diffusion evaluations/evaluator.py), which every
published DiT number went through; `MetricSettings` names the other choices:
- IS (Salimans et al.): exp(E_x KL(p(y|x) || p(y))) per part, averaged over parts. ADM's parts are
  consecutive chunks of 5,000 images (the last one shorter); `is_splits=K` takes K equal splits instead,
  as the original improved-GAN code and torch-fidelity do. The two agree at 50,000 samples only.
- Precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its
  points with radius = squared distance to the k-th nearest neighbour (k=3) in that set, the point itself
  counted as the nearest; precision = fraction of samples inside the reference manifold, recall =
  fraction of reference points inside the sample manifold. ADM computes the squared distances
  |u|² − 2u·v + |v|² of 10,000 × 10,000 blocks in fp16 (inputs, norms, product and sums each rounded to
  fp16) and falls back to fp32 for a block with a non-finite value: `pr_distances="fp16"` does the same,
  "fp32" keeps every distance in fp32.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ditscale.evaluate.features import device_of, npz_features
from ditscale.evaluate.fid import feature_stats, frechet_distance

METRICS = ("fid", "sfid", "is", "pr")
ADM_IS_CHUNK = 5000
ADM_PR_BLOCK = 10000
PR_DISTANCES = ("fp16", "fp32")


@dataclass(frozen=True)
class MetricSettings:
    """Every choice of the metrics that changes a number; the defaults are ADM's."""

    metrics: tuple = METRICS
    is_chunk_size: int | None = ADM_IS_CHUNK  # IS over consecutive chunks of this many images (ADM)
    is_splits: int | None = None  # or over this many equal splits (replaces the chunks)
    pr_distances: str = "fp16"  # fp16 (ADM) | fp32
    pr_k: int = 3  # neighbourhood size of the manifolds

    def __post_init__(self):
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        if self.is_splits is not None:
            object.__setattr__(self, "is_chunk_size", None)
        for name in ("is_chunk_size", "is_splits", "pr_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.is_chunk_size is None and self.is_splits is None:
            raise ValueError("the Inception Score needs is_chunk_size (ADM: 5000) or is_splits")
        if self.pr_distances not in PR_DISTANCES:
            raise ValueError(f"pr_distances must be one of {PR_DISTANCES}, got {self.pr_distances!r}")

    @property
    def is_adm(self) -> bool:
        return (self.is_chunk_size, self.pr_distances, self.pr_k) == (ADM_IS_CHUNK, "fp16", 3)

    def record(self) -> dict:
        """The settings as JSON-ready values, with how the IS was split spelled out."""
        split = (
            f"consecutive chunks of {self.is_chunk_size} images"
            if self.is_splits is None
            else f"{self.is_splits} equal splits"
        )
        return {**asdict(self), "metrics": list(self.metrics), "is_parts": split}


#################################################################################
#                                Inception Score                                #
#################################################################################


def inception_score(logits, chunk_size=ADM_IS_CHUNK, splits=None):
    """(mean, std) of the Inception Score of class logits (N, K) over consecutive chunks of `chunk_size`
    images (ADM), or over `splits` equal splits when given."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    if splits is not None:
        if logits.ndim != 2 or n < splits:
            raise ValueError(f"need logits (N ≥ splits={splits}, K), got shape {tuple(logits.shape)}")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    else:
        if logits.ndim != 2 or n == 0:
            raise ValueError(f"need logits (N ≥ 1, K), got shape {tuple(logits.shape)}")
        bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    log_p = torch.log_softmax(logits, dim=1)  # (N, K)
    scores = []
    for lo, hi in bounds:
        part = log_p[lo:hi]
        log_py = torch.logsumexp(part, 0) - np.log(len(part))  # log of the part's marginal p(y)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


#################################################################################
#                              Precision / recall                               #
#################################################################################


def _sq_dists_fp32(a, b):
    """Squared Euclidean distances (n, m) between rows of a (n, D) and b (m, D)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def _fp16(x):
    """x rounded to fp16 (overflow → inf), kept in fp32 for the arithmetic."""
    return x.to(torch.float16).to(torch.float32)


def _sq_dists_fp16(a, b):
    """ADM's block distances: fp16 inputs; norms, product and each sum rounded to fp16 (accumulated in
    fp32, as GPU kernels do); the fp32 distances instead when any value of the block is not finite."""
    a16, b16 = _fp16(a), _fp16(b)
    na = _fp16(a16.square().sum(1, keepdim=True))  # (n, 1)
    nb = _fp16(b16.square().sum(1))  # (m,)
    d = _fp16(_fp16(na - _fp16(2 * _fp16(a16 @ b16.T))) + nb).clamp_min_(0)
    return d if torch.isfinite(d).all() else _sq_dists_fp32(a, b)


SQ_DISTS = {"fp16": _sq_dists_fp16, "fp32": _sq_dists_fp32}


def manifold_radii(features, k=3, batch_size=ADM_PR_BLOCK, distances="fp16"):
    """Squared distance of each point (N, D) to its k-th nearest neighbour in the set (itself the 0th)."""
    n, dist = len(features), SQ_DISTS[distances]
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r in range(0, n, batch_size):
        rows = features[r : r + batch_size]
        nearest = None  # (rows, k + 1) smallest so far
        for c in range(0, n, batch_size):
            d = dist(rows, features[c : c + batch_size])
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r : r + batch_size] = nearest[:, k]
    return radii


def mutual_coverage(ref, fake, ref_radii, fake_radii, batch_size=ADM_PR_BLOCK, distances="fp16"):
    """(fake_in (M,), ref_in (N,)): whether each sample lies in some reference ball, and each reference
    point in some sample ball. One pass over (ref block, sample block) distances, ref as the rows, as ADM
    (the fp16 rounding of |u|² − 2u·v + |v|² depends on which side comes first)."""
    dist = SQ_DISTS[distances]
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    for r in range(0, len(ref), batch_size):
        for f in range(0, len(fake), batch_size):
            d = dist(ref[r : r + batch_size], fake[f : f + batch_size])  # (ref rows, sample cols)
            ref_in[r : r + batch_size] |= (d <= fake_radii[f : f + batch_size]).any(1)
            fake_in[f : f + batch_size] |= (d <= ref_radii[r : r + batch_size, None]).any(0)
    return fake_in, ref_in


def precision_recall(ref_features, sample_features, k=3, batch_size=ADM_PR_BLOCK, device=None, distances="fp16"):
    """(precision, recall) of samples (M, D) against reference features (N, D)."""
    if distances not in SQ_DISTS:
        raise ValueError(f"distances must be one of {PR_DISTANCES}, got {distances!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or fake.ndim != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"need features (N, D) and (M, D), got {tuple(ref.shape)} and {tuple(fake.shape)}")
    opts = dict(batch_size=batch_size, distances=distances)
    fake_in, ref_in = mutual_coverage(
        ref, fake, manifold_radii(ref, k, **opts), manifold_radii(fake, k, **opts), **opts
    )
    return fake_in.double().mean().item(), ref_in.double().mean().item()


#################################################################################
#                               All metrics                                     #
#################################################################################


def compute_metrics(features, reference, settings=MetricSettings(), device=None):
    """Metrics of sample features {"pool", "spatial"?, "logits"?} against a Reference. Returns a dict of
    numbers; a requested metric that the inputs cannot give is listed under "skipped" with the reason."""
    s = settings
    out, skipped = {"num_samples": len(features["pool"])}, {}
    if "fid" in s.metrics:
        out["fid"] = frechet_distance(feature_stats(features["pool"]), reference.pool)
    if "sfid" in s.metrics:
        if reference.spatial is None or features.get("spatial") is None:
            skipped["sfid"] = "no spatial statistics in the " + (
                "reference (mu_s/sigma_s)" if reference.spatial is None else "feature network's output"
            )
        else:
            out["sfid"] = frechet_distance(feature_stats(features["spatial"]), reference.spatial)
    if "is" in s.metrics:
        if features.get("logits") is None:
            skipped["is"] = "the feature network gives no logits"
        else:
            out["inception_score"], out["inception_score_std"] = inception_score(
                features["logits"], s.is_chunk_size, s.is_splits
            )
    if "pr" in s.metrics:
        if reference.pool_features is None:
            skipped["pr"] = "the reference has no images or pool features (only statistics)"
        else:
            out["precision"], out["recall"] = precision_recall(
                reference.pool_features, features["pool"], k=s.pr_k, device=device, distances=s.pr_distances
            )
    if skipped:
        out["skipped"] = skipped
    return out


def evaluate_npz(samples, reference, net, settings=MetricSettings(), batch_size=200, progress=True):
    """Metrics of the images arr_0 of an ADM sample .npz against a Reference, with feature network `net`."""
    features = npz_features(net, samples, batch_size=batch_size, progress=progress)
    return compute_metrics(features, reference, settings, device=device_of(net))
