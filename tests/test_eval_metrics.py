"""Fréchet distance, feature extractors, the shipped digit classifier and the MNIST helpers (CPU, seconds)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.eval.metrics import (
    DigitFeatures,
    FeatureExtractor,
    InceptionFeatures,
    RandomConvFeatures,
    digit_accuracy,
    feature_stats,
    frechet_distance,
    frechet_distance_between,
)
from fewstep.eval.mnist import (
    DIGIT_WORDS,
    IMAGES,
    LABELS,
    caption_for,
    label_from_prompt,
    load_eval_arrays,
    pad32,
    read_mnist,
    split_indices,
    write_mnist_folder,
)

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SUBSET = Path(fewstep.__file__).resolve().parent / "assets" / "mnist_subset.npz"


def _need_mnist() -> Path:
    if not (MNIST / IMAGES).is_file():
        pytest.skip(f"the MNIST IDX files are not at {MNIST} (a developer checkout has them in ../shared/data/mnist)")
    return MNIST


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 held-out digits [1000, 1, 32, 32] in [0, 1] with labels: from the MNIST files when they are
    there, else from the bundled subset (the same 1,000 images)."""
    if (MNIST / IMAGES).is_file():
        return load_eval_arrays(MNIST)
    data = np.load(SUBSET)
    x = torch.from_numpy(pad32(data["eval_images"])).float().div(255)[:, None]
    return x, torch.from_numpy(data["eval_labels"].astype(np.int64))


# --- Fréchet distance ------------------------------------------------------------------------------------


def test_frechet_distance_1d_closed_form():
    m1, s1, m2, s2 = 1.5, 4.0, -0.5, 9.0
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
    assert frechet_distance([m1], [[s1]], [m2], [[s2]]) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(np.array(m1), np.array(s1), np.array(m2), np.array(s2)) == pytest.approx(expected)


def test_frechet_distance_diagonal_gaussians_identity_and_symmetry():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    d12 = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert d12 == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, np.diag(v2), mu1, np.diag(v1)) == pytest.approx(d12, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_full_covariances_match_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)  # Σ₁ Σ₂ not symmetric: a real test
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_with_singular_covariances():
    """Fewer samples than features (rank-deficient covariances): finite, non-negative, ~0 against itself."""
    f1, f2 = torch.randn(10, 64, generator=torch.Generator().manual_seed(0)), torch.randn(10, 64) + 1
    s = feature_stats(f1)
    d = frechet_distance(*s, *feature_stats(f2))
    assert np.isfinite(d) and d > 0
    assert frechet_distance(*s, *s) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3))) == pytest.approx(3)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    f = torch.randn(50, 3)
    mu, sigma = feature_stats(f)
    ref = f.double().numpy()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (3, 3)
    assert np.allclose(mu, ref.mean(0)) and np.allclose(sigma, np.cov(ref, rowvar=False))


# --- feature extractors ----------------------------------------------------------------------------------


def test_extractors_follow_the_protocol_and_take_grey_or_rgb_any_size():
    grey = torch.rand(4, 1, 28, 28)
    for ex in (DigitFeatures(), RandomConvFeatures(dim=16)):
        assert isinstance(ex, FeatureExtractor) and isinstance(ex.name, str)
        f_grey = ex(grey)
        f_rgb = ex(grey.expand(-1, 3, -1, -1))
        assert f_grey.shape == (4, 128 if isinstance(ex, DigitFeatures) else 16)
        assert torch.allclose(f_grey, f_rgb, atol=1e-5)
    # The random stand-in is a fixed function of its seed.
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(RandomConvFeatures(seed=3)(x), RandomConvFeatures(seed=3)(x))
    assert not torch.equal(RandomConvFeatures(seed=3)(x), RandomConvFeatures(seed=4)(x))


@pytest.mark.parametrize("extractor", [DigitFeatures, RandomConvFeatures])
def test_distance_is_zero_for_a_set_and_large_against_blank_images(extractor, heldout):
    images = heldout[0]
    ex = extractor()
    same = frechet_distance_between(ex, images, images, batch_size=300)
    blank = frechet_distance_between(ex, images, torch.zeros_like(images))
    halves = frechet_distance_between(ex, images[:500], images[500:])  # two samples of one distribution
    assert same < 1e-6
    assert blank > 100 * max(same, 1e-6) and blank > 10 * halves and blank > 1.0


def test_inception_features_fail_clearly_without_torchmetrics():
    if importlib.util.find_spec("torchmetrics") and importlib.util.find_spec("torch_fidelity"):
        pytest.skip("torchmetrics and torch-fidelity are installed here")
    with pytest.raises(RuntimeError, match="weights_path"):
        InceptionFeatures()


# --- the shipped digit classifier ------------------------------------------------------------------------


def test_shipped_classifier_is_small_and_reads_the_heldout_digits():
    from fewstep.eval.digits import ASSET, DigitNet, load_digit_classifier

    root = _need_mnist()
    assert ASSET.stat().st_size < 1_000_000
    info = json.loads(ASSET.with_suffix(".json").read_text())
    model = load_digit_classifier()
    assert isinstance(model, DigitNet) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    images, labels = load_eval_arrays(root)
    assert images.shape == (1000, 1, 32, 32) and labels.shape == (1000,)
    acc = digit_accuracy(images, labels, model)
    assert acc >= 0.97
    assert acc == pytest.approx(info["accuracy"], abs=0.002)  # the number recorded next to the weights
    # RGB input and list labels work the same.
    assert digit_accuracy(images[:100].expand(-1, 3, -1, -1), labels[:100].tolist(), model) == pytest.approx(
        digit_accuracy(images[:100], labels[:100], model))


# --- MNIST helpers ---------------------------------------------------------------------------------------


def test_captions_round_trip():
    assert caption_for(7) == "a handwritten digit seven"
    for d, word in enumerate(DIGIT_WORDS):
        assert caption_for(d) == f"a handwritten digit {word}"
        assert label_from_prompt(caption_for(d)) == d
        assert label_from_prompt(caption_for(np.uint8(d)).upper()) == d
    assert label_from_prompt("a photo of a cat") is None
    assert label_from_prompt("someone's drawing") is None  # "one" inside a word is not a digit word
    with pytest.raises(ValueError):
        caption_for(10)


def test_split_is_deterministic_disjoint_and_sized():
    tr, ev = split_indices()
    tr2, ev2 = split_indices()
    assert np.array_equal(tr, tr2) and np.array_equal(ev, ev2)
    assert len(tr) == 9000 and len(ev) == 1000
    assert not set(tr.tolist()) & set(ev.tolist()) and set(tr.tolist()) | set(ev.tolist()) == set(range(10000))
    # Seeded random splits: the same for a seed, other for another, always a partition.
    a, b = split_indices(seed=1), split_indices(seed=1)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], split_indices(seed=2)[1])
    assert len(a[0]) == 9000 and len(a[1]) == 1000 and not set(a[0].tolist()) & set(a[1].tolist())
    with pytest.raises(ValueError):
        split_indices(100, 100)


def test_heldout_split_is_balanced(heldout):
    counts = np.bincount(heldout[1].numpy(), minlength=10)
    assert counts.sum() == 1000 and counts.min() >= 70 and counts.max() <= 130


def test_pad32():
    x = np.full((2, 28, 28), 255, np.uint8)
    y = pad32(x)
    assert y.shape == (2, 32, 32) and y[:, 2:30, 2:30].min() == 255 and y.sum() == x.sum()
    assert pad32(x[0]).shape == (32, 32)


def _fake_idx(root: Path, n: int) -> np.ndarray:
    """Tiny IDX .gz files in the MNIST layout (16-byte / 8-byte headers); returns the labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    (root / IMAGES).write_bytes(gzip.compress(b"\0\0\x08\x03" + bytes(12) + images.tobytes()))
    (root / LABELS).write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(4) + labels.tobytes()))
    return labels


def test_read_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match=IMAGES):
        read_mnist(tmp_path)
    labels = _fake_idx(tmp_path / "fake", 1100)
    images, got = read_mnist(tmp_path / "fake")
    assert images.shape == (1100, 28, 28) and images.dtype == np.uint8 and np.array_equal(got, labels)
    if (MNIST / IMAGES).is_file():
        images, labels = read_mnist(MNIST)
        assert images.shape == (10000, 28, 28) and labels.shape == (10000,) and labels.max() == 9


@pytest.mark.parametrize("split", ["train", "eval"])
def test_write_mnist_folder(tmp_path, split):
    from PIL import Image

    root = MNIST if (MNIST / IMAGES).is_file() else tmp_path / "fake"
    if root != MNIST:
        _fake_idx(root, 1100)
    _, all_labels = read_mnist(root)
    out = write_mnist_folder(root, tmp_path / "folder", split, limit=20)
    assert isinstance(out, Path) and out == tmp_path / "folder"
    pngs, txts = sorted(out.glob("*.png")), sorted(out.glob("*.txt"))
    assert len(pngs) == 20 and [p.stem for p in pngs] == [t.stem for t in txts] == [f"{i:05d}" for i in range(20)]
    labels = json.loads((out / "labels.json").read_text())
    expected = all_labels[split_indices(len(all_labels))[0 if split == "train" else 1][:20]]
    assert labels == expected.tolist()
    for png, txt, label in zip(pngs, txts, labels):
        img = Image.open(png)
        assert img.size == (32, 32) and img.mode == "RGB"
        assert txt.read_text() == caption_for(label)
    arr = np.asarray(Image.open(pngs[0]))
    assert (arr[..., 0] == arr[..., 1]).all() and arr[:2].max() == 0  # grey as RGB, 2 px black border
    with pytest.raises(ValueError, match="split"):
        write_mnist_folder(root, tmp_path / "bad", "test")
