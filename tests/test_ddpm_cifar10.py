"""The exact google/ddpm-cifar10-32 topology (35.7M parameters): capture speed and exactness."""
from __future__ import annotations

import time

import pytest
import torch
from diffusers import UNet2DModel

import maskc
from archs import randomize
from maskc.models.configs import DDPM_CIFAR10
from test_equivalence import Case, leaves_equal, reference_outputs, trajectory


@pytest.fixture(scope="module")
def ddpm() -> UNet2DModel:
    torch.manual_seed(0)
    return randomize(UNet2DModel(**DDPM_CIFAR10), 0)


def test_topology(ddpm) -> None:
    assert round(sum(p.numel() for p in ddpm.parameters()) / 1e6, 1) == 35.7
    names = maskc.blocks(ddpm)
    assert len(names) == 28  # 22 ResnetBlock2D + 6 Attention (2 down, 1 mid, 3 up)
    assert sum(".attentions." in n for n in names) == 6


def test_capture_rewrite_time_and_exactness(ddpm) -> None:
    names = maskc.blocks(ddpm)
    steps = 6
    g = torch.Generator().manual_seed(3)
    bits = torch.rand(steps, len(names), generator=g) < 0.5
    bits[0] = True
    case = Case("ddpm", ddpm, (1, 3, 32, 32), lambda x, t: ((x, t), {}), {})
    t0 = time.perf_counter()
    tm = maskc.compile(ddpm, maskc.Mask(bits, names), example_args=(torch.randn(1, 3, 32, 32), torch.tensor(999)))
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"capture + rewrite took {elapsed:.1f} s"
    expected = reference_outputs(case, bits, names, steps)
    for i, (_, out) in enumerate(trajectory(case, tm, steps)):
        assert leaves_equal(out, expected[i]), f"step {i}"
