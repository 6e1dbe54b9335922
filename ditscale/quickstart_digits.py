"""The quickstart's embedded dataset and its quality checks: scikit-learn's handwritten digits.

1,797 real 8×8 grey images of 10 classes ship inside scikit-learn, so the whole pipeline (data_prep →
trainer → sampler) runs on real data with no download. Quality is measured, not assumed:

- accuracy: an SVM trained on all real digits labels generated samples; the share that gets the class
  they were asked for;
- diversity: per class, the mean pairwise distance of generated samples divided by that of the real
  digits of the class (≈ 1 for samples as varied as the data, → 0 for copies of one image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditscale.evaluate.digits import DIGIT_MAX, load_real_digits


def write_image_folder(root: str | Path) -> Path:
    """Write the digits as 8×8 grey PNGs in the ImageNet train layout (one folder per class)."""
    from PIL import Image

    root = Path(root)
    images, labels = load_real_digits()
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(img / DIGIT_MAX * 255.0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return root


def to_digit_scale(samples: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] (pixel-mode latents), any shape (N, [1,] 8, 8) → (N, 64) in [0, 16]."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    if x.shape[1] != 64:
        raise ValueError(f"expected 8×8 single-channel samples, got {samples.shape}")
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0) * DIGIT_MAX


def _mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over distinct pairs of rows of x (n, d)."""
    if len(x) < 2:
        return float("nan")
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    iu = np.triu_indices(len(x), k=1)
    return float(np.sqrt(d2[iu]).mean())


def fit_classifier():
    """An RBF SVM on all real digits (scikit-learn's reference setting; ~99 % held-out accuracy)."""
    from sklearn.svm import SVC

    images, labels = load_real_digits()
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), -1), labels)


# Per objective: its config (configs/), sampler and steps (≈ 100 model calls either way)
RECIPES = {"ddpm": ("quickstart.yaml", "ddpm", 100), "flow": ("quickstart_flow.yaml", "heun", 50)}


def sample_digits(export, kind: str, per_class: int = 20, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(samples (N, 1, 8, 8) in [-1, 1], labels (N,)) of an exported digits model, `per_class` of each class,
    guided (scale 3, every channel) with its objective's recipe sampler; noise from seed 0. A model trained
    with another objective than `kind` is refused (ObjectiveMismatch)."""
    import torch

    from ditscale.sampling import sample_latents
    from ditscale.weights import load_model, load_objective

    _, sampler, steps = RECIPES[kind]
    objective = load_objective(export, expected=kind)
    labels = torch.arange(10).repeat_interleave(per_class)
    z = sample_latents(
        load_model(export).eval(),
        None,
        labels,
        cfg_scale=3.0,
        guide_channels="all",
        sampler=sampler,
        steps=steps,
        objective=objective,
        generator=torch.Generator().manual_seed(0),
        device="cpu",
        progress=progress,
    )
    return z.clamp(-1, 1).numpy(), labels.numpy()


def digits_quality(samples: np.ndarray, labels: np.ndarray, classifier=None) -> dict:
    """Accuracy and per-class diversity ratio of generated digits (samples in [-1, 1])."""
    x = to_digit_scale(samples)
    labels = np.asarray(labels, dtype=np.int64)
    classifier = classifier if classifier is not None else fit_classifier()
    accuracy = float((classifier.predict(x) == labels).mean())
    real, real_labels = load_real_digits()
    real = real.reshape(len(real), -1)
    ratios = {}
    for c in np.unique(labels):
        gen_c = x[labels == c]
        if len(gen_c) >= 2:
            ratios[int(c)] = _mean_pairwise_distance(gen_c) / _mean_pairwise_distance(real[real_labels == c])
    values = list(ratios.values())
    return {
        "accuracy": accuracy,
        "diversity_mean": float(np.mean(values)) if values else float("nan"),
        "diversity_min": float(np.min(values)) if values else float("nan"),
        "diversity_per_class": ratios,
        "num_samples": int(len(x)),
    }
