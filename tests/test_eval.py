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
