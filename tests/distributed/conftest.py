"""Datasets for the trainer's distributed tests: scikit-learn's handwritten digits in pixel mode (8×8×1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_digits(root: Path, count: int | None = None) -> Path:
    """The first `count` digits (all 1,797 by default) as grey PNGs in class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if count is None else count
    for i in range(n):
        folder = root / f"digit_{int(digits.target[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[i] / 16.0 * 255.0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return root


def digits_dataset(base: Path, count: int | None) -> str:
    from data_prep import make_dataset

    images = write_digits(base / "images", count)
    return make_dataset(str(images), str(base / "mds"), resolution=8, vae="none", image_channels=1, decode_workers=0)


@pytest.fixture(scope="session")
def digits64(tmp_path_factory) -> str:
    """64 digits: 8 steps per epoch at global batch 8, so short runs cross an epoch boundary."""
    return digits_dataset(tmp_path_factory.mktemp("digits64"), 64)


@pytest.fixture(scope="session")
def digits_all(tmp_path_factory) -> str:
    return digits_dataset(tmp_path_factory.mktemp("digits_all"), None)


@pytest.fixture(scope="session")
def reference_run(digits64, tmp_path_factory):
    """reference_run(stage) → run_dir of the 2-rank reference run for that ZeRO stage (made on first use)."""
    from ds_launch import reference_overrides, train

    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            base = tmp_path_factory.mktemp(f"reference_zero{stage}")
            result = train(
                2,
                reference_overrides(stage, base / "run", digits64),
                base / "run.log",
                env={"DITSCALE_DATA_CACHE": str(base / "cache")},
            )
            assert result.returncode == 0, result.output[-5000:]
            runs[stage] = base / "run"
        return runs[stage]

    return get


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own streaming cache, so a killed run cannot leave state for the next test."""
    monkeypatch.setenv("DITSCALE_DATA_CACHE", str(tmp_path / "cache"))
