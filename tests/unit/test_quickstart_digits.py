"""The quickstart's quality checks must separate good samples from bad ones, on real digits."""

import numpy as np
import pytest

from ditscale import quickstart_digits as qd


@pytest.fixture(scope="module")
def held_out():
    """Real digits as if generated (in [-1, 1]); the classifier is trained on the other half."""
    from sklearn.svm import SVC

    images, labels = qd.load_real_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    clf = SVC(gamma=0.001, C=10.0).fit(images[train].reshape(len(train), -1), labels[train])
    samples = images[test] / qd.DIGIT_MAX * 2.0 - 1.0
    return samples, labels[test], clf


def test_real_digits_pass_both_checks(held_out):
    samples, labels, clf = held_out
    q = qd.digits_quality(samples, labels, classifier=clf)
    assert q["accuracy"] > 0.95
    assert 0.9 < q["diversity_mean"] < 1.1
    assert q["diversity_min"] > 0.8


def test_copies_fail_diversity(held_out):
    samples, labels, clf = held_out
    copies = np.stack([samples[labels == c][0] for c in labels])
    copies = copies + np.random.default_rng(1).normal(0, 0.01, copies.shape)
    q = qd.digits_quality(copies, labels, classifier=clf)
    assert q["accuracy"] > 0.9  # copies of real digits are recognisable...
    assert q["diversity_mean"] < 0.1  # ...but not varied


def test_wrong_labels_fail_accuracy(held_out):
    samples, labels, clf = held_out
    q = qd.digits_quality(samples, (labels + 1) % 10, classifier=clf)
    assert q["accuracy"] < 0.1


def test_noise_is_not_a_digit(held_out):
    _, labels, clf = held_out
    noise = np.random.default_rng(2).uniform(-1, 1, (len(labels), 8, 8))
    assert qd.digits_quality(noise, labels, classifier=clf)["accuracy"] < 0.3


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match="8×8"):
        qd.to_digit_scale(np.zeros((4, 3, 8, 8)))


def test_image_folder_layout(tmp_path):
    from PIL import Image

    root = qd.write_image_folder(tmp_path / "digits")
    folders = sorted(p.name for p in root.iterdir())
    assert folders == [f"digit_{i}" for i in range(10)]
    assert sum(1 for _ in root.glob("*/*.png")) == 1797
    img = np.asarray(Image.open(next(root.glob("digit_3/*.png"))))
    assert img.shape == (8, 8) and img.dtype == np.uint8
