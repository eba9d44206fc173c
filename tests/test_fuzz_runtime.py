"""Fuzzed runtime inputs: every call either matches the model exactly or raises a MaskcError.

Never an unrelated exception, never a silent wrong answer.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

import maskc
from archs import randomize

_MODEL = None


def model() -> UNet2DModel:
    global _MODEL
    if _MODEL is None:
        _MODEL = randomize(UNet2DModel(
            sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        ), 0)
    return _MODEL


sample_st = st.builds(
    lambda n, c, hw, dt: torch.randn(n, c, *hw).to(dt),
    st.integers(1, 2), st.sampled_from([1, 2, 3]), st.sampled_from([(8, 8), (16, 16), (8, 16), (6, 6)]),
    st.sampled_from([torch.float32, torch.float64, torch.int64]),
)
timestep_st = st.one_of(
    st.integers(0, 999), st.floats(0, 999, allow_nan=False),
    st.builds(lambda v: torch.tensor(v), st.integers(0, 999)),
    st.builds(lambda v, n: torch.full((n,), v), st.integers(0, 999), st.integers(1, 3)),
    st.none(), st.just("ten"),
)
extra_st = st.sampled_from([{}, {"return_dict": False}, {"class_labels": torch.tensor([1])}, {"nonsense": 1}])


@given(calls=st.lists(st.tuples(sample_st, timestep_st, extra_st, st.booleans()), min_size=1, max_size=5),
       skip=st.booleans())
@settings(max_examples=60)
def test_fuzzed_calls(calls, skip) -> None:
    m = model()
    names = maskc.blocks(m)
    bits = torch.ones(3, len(names), dtype=torch.bool)
    if skip:
        bits[1:, ::2] = False
    from reference import HookReference

    tm = maskc.compile(m, maskc.Mask(bits, names))
    ref = HookReference(m, bits, names)
    try:
        for x, t, extra, reset in calls:
            if reset:
                tm.reset()
                ref.step = 0
                ref.cache.clear()
            if tm.step >= 3:
                with pytest.raises(maskc.StepOverflowError):
                    tm(x, t, **extra)
                continue
            step = tm.step
            try:
                ref.step = step
                want = ref(x, t, **extra)
                ok = True
            except Exception:  # noqa: BLE001 - the model itself refuses these inputs
                ok = False
            try:
                got = tm(x, t, **extra)
            except maskc.MaskcError:
                # refused: the model refused too, or inputs changed mid-generation; either way
                # the generation cannot go on consistently
                tm.reset()
                ref.step = 0
                ref.cache.clear()
                continue
            assert ok, "maskc answered where the model raised"
            gl, wl = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
            assert all(torch.equal(a, b) for a, b in zip(gl, wl)), "silent wrong answer"
    finally:
        ref.close()
