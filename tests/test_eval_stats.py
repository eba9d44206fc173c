"""The shipped evaluation statistics (maskc/models/weights/fmnist-eval): what FD-FMNIST and KID compare against.

Without the dataset, they are checked against themselves, the shipped classifier and the shipped
image sample; with Debian's dataset installed, against features computed afresh from it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil

import pytest
import torch

from maskc import data
from maskc.errors import MaskcError
from maskc.eval import FMNISTFeatures, file_sha256, load_reference

EVAL_DIR = data.EVAL_DIR


@pytest.fixture(scope="module")
def feats() -> FMNISTFeatures:
    return FMNISTFeatures(kid_subset_size=100, kid_subsets=5)


def _within_float16(shipped: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Per-row max of |shipped - fresh| beyond float16 rounding of ``fresh`` (<= 0 where within it)."""
    bound = fresh.abs() * 2.0 ** -11 + 1e-5  # half an ulp of float16, plus float32 noise of another batching
    return ((shipped - fresh).abs() - bound).amax(1)


def _fd(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    from torchmetrics.image.fid import _compute_fid

    return float(_compute_fid(mu1.double(), s1.double(), mu2.double(), s2.double()))


def test_shipped_files_are_small_described_and_packaged() -> None:
    names = sorted(os.listdir(EVAL_DIR))
    assert names == ["MODEL_CARD.md", "reference.safetensors", "sample.safetensors", "stats.json"]
    assert sum(os.path.getsize(os.path.join(EVAL_DIR, n)) for n in names) < 5_000_000
    meta = json.load(open(os.path.join(EVAL_DIR, "stats.json")))
    ref = load_reference()
    assert meta["counts"]["test_features"] == len(ref.test_features) == len(ref.test_labels) == 10000
    assert meta["counts"]["train_pool"] == len(ref.train_features) == len(ref.train_index)
    assert meta["classifier"]["sha256"] in open(os.path.join(EVAL_DIR, "MODEL_CARD.md")).read()
    # a non-editable install carries them: every file matches a package-data pattern of maskc.models
    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python >= 3.11) reads pyproject.toml")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["maskc.models"]
    for n in names:
        rel = f"weights/fmnist-eval/{n}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)


def test_shipped_features_are_the_classifiers_features_of_the_shipped_images(feats: FMNISTFeatures) -> None:
    """Dataset-free: the 500 shipped test images, run through the shipped classifier now, give the
    shipped feature rows at their indices, and the shipped labels."""
    images, labels, index = data.load_sample()
    ref = feats.reference
    assert images.shape == (500, 1, 32, 32) and images.min() == -1 and images.max() == 1
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 50))
    assert torch.equal(labels, ref.test_labels[index])
    fresh = feats.features((images + 1) / 2)
    excess = _within_float16(ref.test_features[index], fresh)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} of 500 rows differ, worst by {float(excess.max())}"


def test_shipped_moments_and_labels_fit_the_shipped_features(feats: FMNISTFeatures) -> None:
    ref = feats.reference
    f = ref.test_features.double()
    assert torch.allclose(f.mean(0), ref.test_mu, atol=1e-4, rtol=0)  # float16 rounding moves it by 5e-6
    # float16 rounding moves the covariance by 1.6e-5 at most (2e-5 of its largest entry); dividing by n
    # instead of n - 1 would move it by 8e-5
    assert float((torch.cov(f.T) - ref.test_sigma).abs().max()) < 5e-5 * float(ref.test_sigma.abs().max())
    assert _fd(f.mean(0), torch.cov(f.T), ref.test_mu, ref.test_sigma) < 1e-5  # float16 rounding: 3e-8 here
    # the rows line up with the labels: the classifier's head reads the shipped features as it was trained to
    acc = float((feats.clf.head(ref.test_features).argmax(1) == ref.test_labels).float().mean())
    assert acc == pytest.approx(ref.meta["test_accuracy_from_shipped_features"], abs=1e-4) and acc > 0.9
    idx = ref.train_index
    assert len(idx.unique()) == len(idx) and 0 <= int(idx.min()) and int(idx.max()) < 60000


def test_statistics_of_another_classifier_are_refused(tmp_path) -> None:
    for n in os.listdir(EVAL_DIR):
        shutil.copy(os.path.join(EVAL_DIR, n), tmp_path / n)
    meta = json.loads((tmp_path / "stats.json").read_text())
    meta["classifier"]["sha256"] = "0" * 64
    (tmp_path / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(MaskcError, match="classifier.*make_eval_stats"):
        load_reference(str(tmp_path))
    with pytest.raises(MaskcError, match="not found.*reinstall"):
        load_reference(str(tmp_path / "missing"))


def test_evaluation_runs_without_the_dataset(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(data.ROOT_ENV, str(tmp_path / "no-fashion-mnist"))
    assert not data.available()
    with pytest.raises(MaskcError, match=r"apt-get install -y dataset-fashion-mnist.*MASKC_FMNIST_ROOT"):
        data.load_images("train")
    f = FMNISTFeatures(kid_subset_size=50, kid_subsets=2)
    images, _, _ = data.load_sample()
    r = f((images + 1) / 2)
    assert 0 < r["fd"] < f(torch.rand(500, 1, 32, 32))["fd"] / 10
    with pytest.raises(MaskcError, match="--train-pool"):
        f.floor(len(f.reference.train_features) + 1)


@pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed (apt-get install -y "
                    "dataset-fashion-mnist, or MASKC_FMNIST_ROOT): the shipped statistics are not checked against it")
def test_shipped_statistics_match_the_dataset(feats: FMNISTFeatures) -> None:
    """Everything shipped, recomputed from the dataset here (independently of examples/make_eval_stats.py)."""
    ref = feats.reference
    files = {os.path.basename(data._path(s, k, data.data_root())): file_sha256(data._path(s, k, data.data_root()))
             for s in ("train", "test") for k in ("images", "labels")}
    assert files == ref.meta["dataset"]["files"]
    test_labels = data.load_labels("test")
    assert torch.equal(test_labels, ref.test_labels)
    fresh = feats.features((data.load_images("test") + 1) / 2)
    excess = _within_float16(ref.test_features, fresh)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} of 10000 test rows differ, worst by {float(excess.max())}"
    f64 = fresh.double()
    mu, sigma = f64.mean(0), torch.cov(f64.T)
    assert torch.allclose(mu, ref.test_mu, rtol=1e-6, atol=1e-7) and torch.allclose(sigma, ref.test_sigma, rtol=1e-5, atol=1e-7)
    # FD of the same samples, against shipped and against fresh moments, agrees (maskc reports it in float32)
    train = (data.load_images("train") + 1) / 2
    pool = feats.features(train[ref.train_index])
    assert (_within_float16(ref.train_features, pool) <= 0).all()
    other = feats.features(train[torch.randperm(60000, generator=torch.Generator().manual_seed(7))[:1000]])
    o64 = other.double()
    fd_fresh = _fd(o64.mean(0), torch.cov(o64.T), mu, sigma)
    fd_shipped = feats.score_features(other)["fd"]
    assert abs(fd_shipped - fd_fresh) <= 1e-5 * fd_fresh, (fd_shipped, fd_fresh)
    images, labels, index = data.load_sample()
    assert torch.equal(data.load_pixels("test")[index], ((images[:, 0, 2:30, 2:30] + 1) * 127.5).round().byte())
