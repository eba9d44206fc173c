"""The evaluation harness: FD/KID with the shipped classifier, fidelity, timing and memory helpers."""
from __future__ import annotations

import pytest
import torch

from maskc.eval import FMNISTFeatures, fidelity, interleaved_times, peak_memory, summarize_times


@pytest.fixture(scope="module")
def feats() -> FMNISTFeatures:
    return FMNISTFeatures(kid_subset_size=200, kid_subsets=10)


def test_fd_of_the_reference_set_is_zero_and_the_floor_is_small(feats: FMNISTFeatures) -> None:
    same = feats.score_features(feats.reference.test_features)  # the test set's own (shipped) features
    assert abs(same["fd"]) < 1e-3 and abs(same["kid"]) < 1e-2
    floor = feats.floor(500)
    noise = feats(torch.rand(500, 1, 32, 32))
    assert 0 < floor["fd"] < noise["fd"] / 20, (floor, noise)
    assert floor == feats.floor(500)  # seeded: the same images, the same KID subsets


def test_classifier_accuracy(feats: FMNISTFeatures) -> None:
    from maskc.data import load_sample

    images, labels, _ = load_sample()  # 500 shipped test images, 50 per class
    assert feats.accuracy((images + 1) / 2, labels) > 0.88


def test_fidelity() -> None:
    a = torch.rand(4, 1, 32, 32)
    same = fidelity(a, a)
    assert same["psnr"] > 100 and same["ssim"] == pytest.approx(1.0, abs=1e-5)
    b = (a + 0.1).clamp(0, 1)
    assert 15 < fidelity(b, a)["psnr"] < 25


def test_timing_and_memory_helpers() -> None:
    calls: list[str] = []
    t = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2 and len(t["a"]) == 4
    s = summarize_times([1.0, 2.0, 3.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["n"] == 4
    small = peak_memory(lambda: torch.ones(1 << 16) * 2)
    big = peak_memory(lambda: torch.ones(1 << 20) * 2)
    assert 2 * 4 * (1 << 16) <= small < 4 * 4 * (1 << 16)  # input and output alive together
    assert 15 * small < big


def test_frechet_distances_match_torchmetrics_on_every_resample(feats: FMNISTFeatures) -> None:
    from maskc.eval import bootstrap_counts, fd_terms, frechet_distances

    ref = feats.reference
    x = ref.train_features[:300] * 1.05 + 0.02  # some distance from the test set
    one = frechet_distances(x, ref.test_mu, ref.test_sigma)
    assert one.shape == (1,) and float(one[0]) == pytest.approx(feats.score_features(x)["fd"], rel=1e-5, abs=1e-5)
    counts = bootstrap_counts(300, 4, seed=3)
    assert counts.sum(1).tolist() == [300.0] * 4 and torch.equal(counts, bootstrap_counts(300, 4, seed=3))
    terms = fd_terms(x, ref.test_mu, ref.test_sigma)
    assert terms["mean_term"] + terms["cov_term"] == pytest.approx(float(one[0]), rel=1e-6)
    assert terms["trace"] == pytest.approx(float(torch.cov(x.double().T).trace()))
    boot = frechet_distances(x, ref.test_mu, ref.test_sigma, counts, chunk=3)  # chunks of resamples
    for r in range(4):
        drawn = x.repeat_interleave(counts[r].long(), dim=0)  # resample r, rows repeated as drawn
        assert float(boot[r]) == pytest.approx(feats.score_features(drawn)["fd"], rel=1e-5, abs=1e-5)


def test_fd_between_paired_sets_matches_torchmetrics_on_every_resample(feats: FMNISTFeatures) -> None:
    """FD of one set to another drawn on the same resamples: each resample's value is torchmetrics' FD of
    the two drawn sets (rows of both drawn alike); a set against itself is 0, and the order does not matter."""
    from torchmetrics.image.fid import _compute_fid

    from maskc.errors import MaskcError
    from maskc.eval import bootstrap_counts, frechet_distances_between

    ref = feats.reference
    a = ref.train_features[:300]
    b = a * 1.1 + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
    counts = bootstrap_counts(300, 4, seed=5)
    fd = frechet_distances_between(b, a, counts, chunk=3)
    for r in range(4):
        da, db = (x.double().repeat_interleave(counts[r].long(), dim=0) for x in (a, b))
        want = float(_compute_fid(db.mean(0), torch.cov(db.T), da.mean(0), torch.cov(da.T)))
        assert float(fd[r]) == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert float(frechet_distances_between(a, b)[0]) == pytest.approx(float(frechet_distances_between(b, a)[0]),
                                                                      rel=1e-5)
    assert abs(float(frechet_distances_between(a, a)[0])) < 1e-4
    with pytest.raises(MaskcError, match="same noises"):
        frechet_distances_between(a, a[:299])


def test_paired_bootstrap_shares_the_resamples(feats: FMNISTFeatures) -> None:
    """Every set is scored on the same resamples: a copy differs by exactly zero in each, and a small
    perturbation's FD change has a far narrower paired interval than each FD's own spread."""
    from maskc.errors import MaskcError
    from maskc.eval import bootstrap_counts, interval, paired_bootstrap_fd

    ref = feats.reference
    a = ref.train_features[:400]
    b = a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    counts = bootstrap_counts(400, 200, seed=1)
    fd = paired_bootstrap_fd({"a": a, "copy": a.clone(), "b": b}, ref.test_mu, ref.test_sigma, counts)
    assert torch.equal(fd["a"], fd["copy"])
    own = interval(fd["a"])
    diff = interval(fd["b"] - fd["a"])
    assert own[1] - own[0] > 10 * (diff[1] - diff[0])
    lo, hi = interval(torch.arange(1000.0))
    assert lo == pytest.approx(24.975) and hi == pytest.approx(974.025)
    with pytest.raises(MaskcError, match="same 400 noises"):
        paired_bootstrap_fd({"a": a, "short": a[:399]}, ref.test_mu, ref.test_sigma, counts)
