"""A compiling backend: the step graphs go through torch.compile and agree to float32 round-off."""
from __future__ import annotations

import pytest
import torch

import maskc
from archs import randomize
from maskc.models.dit import DiT


@pytest.mark.slow
def test_inductor_backend_matches_eager() -> None:
    m = randomize(DiT(input_size=8, hidden_size=32, depth=2, num_heads=2), 0)
    names = maskc.blocks(m)
    bits = torch.ones(3, len(names), dtype=torch.bool)
    bits[1:, 1] = False
    eager = maskc.compile(m, maskc.Mask(bits, names))
    comp = maskc.compile(m, maskc.Mask(bits, names), backend="inductor")
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        for i in range(3):
            t = torch.full((2,), 900.0 - 300 * i)
            torch.testing.assert_close(comp(x, t, y), eager(x, t, y), rtol=1e-5, atol=1e-5)
    assert comp[1] is comp[2]  # identical rows share one graph, compiled once
