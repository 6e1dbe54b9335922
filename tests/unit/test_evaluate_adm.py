"""ADM's evaluator by default: its formulas written out here independently, from guided-diffusion's
evaluations/evaluator.py (IS over consecutive chunks of 5,000; precision / recall from 10,000-row blocks of
squared distances computed in fp16 with an fp32 fallback), compared with ditscale's metrics; and the
settings every result records."""

import hashlib
import json

import numpy as np
import pytest
import torch

from ditscale.evaluate import __main__ as cli
from ditscale.evaluate.metrics import MetricSettings, inception_score, manifold_radii, precision_recall
from ditscale.evaluate.tiny import TinyFeatureNet
from ditscale.sampling.npz import prepare_dir, read_npz_meta, run_chunks

# --------------------------------------------------------------------------- ADM, written out


def adm_inception_score(logits, split_size=5000):
    """Softmax, then per consecutive chunk exp(mean_x Σ_y p log(p / mean p)); the mean over chunks."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_block_distances(u, v):
    """The TF graph's pairwise distances: fp16 casts, |u|² − 2uv + |v|² in fp16 (numpy's fp16 arithmetic
    rounds every operation; sums and the product accumulate in fp32 as on a GPU), max with 0; the fp32
    formula when any value is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        nu = np.square(u16.astype(np.float32)).sum(1).astype(np.float16).reshape(-1, 1)
        nv = np.square(v16.astype(np.float32)).sum(1).astype(np.float16).reshape(1, -1)
        uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d16 = np.maximum(nu - np.float16(2) * uv + nv, np.float16(0))
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    nu32, nv32 = np.square(u).sum(1).reshape(-1, 1), np.square(v).sum(1).reshape(1, -1)
    return np.maximum(nu32 - 2 * u @ v.T + nv32, 0).astype(np.float32)


def adm_precision_recall(ref, fake, k=3, block=10000):
    def radii(x):
        out = np.zeros(len(x), np.float32)
        for b in range(0, len(x), block):
            row = np.concatenate(
                [adm_block_distances(x[b : b + block], x[c : c + block]) for c in range(0, len(x), block)], 1
            )
            out[b : b + block] = np.partition(row, np.arange(k + 1), axis=1)[:, k]
        return out

    r_ref, r_fake = radii(ref), radii(fake)
    ref_in, fake_in = np.zeros(len(ref), bool), np.zeros(len(fake), bool)
    for a in range(0, len(ref), block):
        for b in range(0, len(fake), block):
            d = adm_block_distances(ref[a : a + block], fake[b : b + block])  # (ref, fake)
            ref_in[a : a + block] |= (d <= r_fake[None, b : b + block]).any(1)
            fake_in[b : b + block] |= (d <= r_ref[a : a + block, None]).any(0)
    return fake_in.mean(), ref_in.mean()


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_uses_adm_chunks_of_5000():
    """12,000 images: chunks of 5,000, 5,000 and 2,000, as ADM; 10 equal splits would give another number."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4, size=(12_000, 50))
    mean, _ = inception_score(logits)
    assert mean == pytest.approx(adm_inception_score(logits), rel=1e-9)
    assert MetricSettings().is_chunk_size == 5000


def test_equal_splits_differ_from_adm_below_50k_for_a_high_score_set():
    """Confident, balanced predictions over 1,000 classes: a part of m images sees ~1000(1 − e^(−m/1000))
    classes, so 10 splits of 1,000 score far lower than ADM's 2 chunks of 5,000."""
    labels = np.random.default_rng(1).integers(0, 1000, 10_000)
    logits = np.full((10_000, 1000), -30.0)
    logits[np.arange(10_000), labels] = 0.0
    adm, _ = inception_score(logits)
    split10, _ = inception_score(logits, splits=10)
    assert adm == pytest.approx(adm_inception_score(logits), rel=1e-9)
    assert adm > 900 and split10 < 700


# --------------------------------------------------------------------------- precision / recall


def features(n, d, seed, scale=1.0):
    """Non-negative, Inception-like pool features (ReLU outputs) in fp32."""
    return (np.abs(np.random.default_rng(seed).normal(size=(n, d))) * scale).astype(np.float32)


def test_fp16_radii_are_adm_distances():
    x = features(300, 64, 2)
    ours = manifold_radii(torch.from_numpy(x), k=3, distances="fp16").numpy()
    d = adm_block_distances(x, x)
    theirs = np.partition(d, np.arange(4), axis=1)[:, 3]
    assert np.mean(ours == theirs) > 0.99  # fp32 accumulation order aside: equal
    np.testing.assert_allclose(ours, theirs, rtol=2e-3)


@pytest.mark.parametrize("block, seed", [(10000, 3), (10000, 4), (70, 5)])
def test_precision_recall_default_is_adm(block, seed):
    """Equal to ADM's numbers, where the fp32 distances are not (for seed 4: 0.3467 vs ADM's 0.3533)."""
    ref, fake = features(400, 64, seed), features(300, 64, 37 + seed, scale=1.1)
    assert precision_recall(ref, fake, device="cpu", batch_size=block) == adm_precision_recall(ref, fake, block=block)


def test_fp16_overflow_falls_back_to_fp32_per_block():
    """Squared norms above 65,504 overflow fp16: ADM then computes that block in fp32, and so do we."""
    ref, fake = features(120, 32, 5, scale=60.0), features(100, 32, 6, scale=60.0)
    assert (np.square(ref).sum(1) > np.finfo(np.float16).max).any()
    fp16 = precision_recall(ref, fake, device="cpu")
    assert fp16 == pytest.approx(adm_precision_recall(ref, fake), abs=1e-12)
    assert fp16 == pytest.approx(precision_recall(ref, fake, device="cpu", distances="fp32"), abs=1e-12)


def test_fp16_and_fp32_distances_can_disagree():
    """Points whose k-NN radii and cross distances differ by less than fp16's resolution: the setting
    changes the number, which is why it is recorded."""
    rng = np.random.default_rng(7)
    base = features(1, 256, 8, scale=4.0)
    ref = base + rng.normal(scale=0.004, size=(200, 256)).astype(np.float32)
    fake = base + rng.normal(scale=0.0042, size=(200, 256)).astype(np.float32)
    fp16 = precision_recall(ref, fake, device="cpu")
    fp32 = precision_recall(ref, fake, device="cpu", distances="fp32")
    assert fp16 == pytest.approx(adm_precision_recall(ref, fake), abs=2 / 200)
    assert fp16 != fp32


def test_settings_validate():
    with pytest.raises(ValueError, match="pr_distances"):
        MetricSettings(pr_distances="bf16")
    with pytest.raises(ValueError, match="is_chunk_size"):
        MetricSettings(is_chunk_size=0)
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricSettings(metrics=("fid", "kid"))
    assert MetricSettings(is_splits=10).record()["is_parts"] == "10 equal splits"
    assert MetricSettings().is_adm and not MetricSettings(pr_distances="fp32").is_adm


# --------------------------------------------------------------------------- what the CLI records


def test_cli_defaults_are_adm_and_every_setting_is_recorded(tmp_path):
    args = cli.build_parser().parse_args(["--samples", "s.npz", "--ref", "r.npz"])
    assert (args.resize, args.is_chunk_size, args.is_equal_splits, args.pr_distances, args.pr_k) == (
        "tf1",
        5000,
        None,
        "fp16",
        3,
    )

    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    settings = {
        "cfg_scale": 1.5,
        "sampler": "ddpm",
        "steps": 250,
        "guide_channels": 3,
        "labels": "random",
        "weights": "ema",
    }
    prepare_dir(tmp_path / "s", settings, 16)
    samples = run_chunks(tmp_path / "s", 40, 16, lambda idx: (images[idx.start : idx.stop], [i % 4 for i in idx]))
    meta = read_npz_meta(samples)
    assert {k: meta[k] for k in settings} == settings and (meta["per_class_min"], meta["per_class_max"]) == (10, 10)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "m.json"
    argv = [
        "--samples",
        str(samples),
        "--ref",
        str(ref),
        "--out",
        str(out),
        "--no-progress",
        "--is-equal-splits",
        "4",
        "--pr-distances",
        "fp32",
    ]
    assert cli.main(argv, net=TinyFeatureNet().eval()) == 0
    result = json.loads(out.read_text())
    recorded = result["settings"]
    assert recorded["reference_sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert (
        recorded["num_samples"],
        recorded["is_splits"],
        recorded["is_chunk_size"],
        recorded["pr_distances"],
        recorded["pr_k"],
        recorded["adm_defaults"],
    ) == (40, 4, None, "fp32", 3, False)
    assert recorded["feature_network"] == "TinyFeatureNet" and recorded["inception_sha256"] is None
    assert result["sampling"]["cfg_scale"] == 1.5 and result["sampling"]["labels"] == "random"
