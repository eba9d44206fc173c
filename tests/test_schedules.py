"""Peers' schedules as masks: the blocks and steps each method runs, and the equal-MACs search."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from maskc import schedules

UNET = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "mid_block.resnets.0",
        "up_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
DIT = [f"transformer_blocks.{k}.{p}" for k in range(3) for p in ("attn1", "ff")]


def test_deepcache_uniform() -> None:
    m = schedules.deepcache_uniform(UNET, 7, interval=3, depth=1)
    full = [i for i in range(7) if bool(m.bits[i].all())]
    assert full == [0, 3, 6]
    shallow = [n for j, n in enumerate(UNET) if bool(m.bits[:, j].all())]
    assert shallow == ["down_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    assert not bool(m.bits[1, 2]) and m.meta["provenance"]["method"] == "DeepCache uniform"
    m2 = schedules.deepcache_uniform(UNET, 7, interval=3, depth=2)
    assert bool(m2.bits[1].sum() == 5)  # everything but the mid block
    with pytest.raises(maskc.MaskcError, match="down_blocks"):
        schedules.deepcache_uniform(DIT, 5, 2)
    with pytest.raises(maskc.MaskcError, match="depth"):
        schedules.deepcache_uniform(UNET, 5, 2, depth=3)


@given(steps=st.integers(1, 60), data=st.data())
def test_quad_center_steps(steps: int, data) -> None:
    n = data.draw(st.integers(1, steps))
    c = data.draw(st.integers(0, steps - 1))
    s = schedules.quad_center_steps(steps, n, c)
    assert len(s) == n == len(set(s)) and s[0] == 0 and s == sorted(s) and s[-1] < steps


def test_quad_center_is_denser_near_the_center() -> None:
    s = schedules.quad_center_steps(50, 10, 25)
    gaps = {b - a: (a + b) / 2 for a, b in zip(s, s[1:])}
    assert abs(gaps[min(gaps)] - 25) < abs(gaps[max(gaps)] - 25)
    m = schedules.deepcache_nonuniform(UNET, 50, interval=5, depth=1)
    assert int(m.bits.all(1).sum()) == 10


@given(steps=st.integers(2, 60), data=st.data())
def test_deepcache_nonuniform_has_as_many_full_steps_as_uniform(steps: int, data) -> None:
    """DeepCache non-uniform moves the full steps of 1:N, it does not drop any: equal counts, so equal MACs."""
    n = data.draw(st.integers(1, steps))
    u = schedules.deepcache_uniform(UNET, steps, interval=n)
    nu = schedules.deepcache_nonuniform(UNET, steps, interval=n)
    assert int(nu.bits.all(1).sum()) == int(u.bits.all(1).sum()) == len(range(0, steps, n))
    assert torch.equal(nu.bits.sum(0), u.bits.sum(0))


def test_fora() -> None:
    m = schedules.fora(DIT, 7, 3)
    assert m.bits.all(1).tolist() == [True, False, False, True, False, False, True]
    assert not bool(m.bits[1:3].any())


def test_random_equal_macs_hits_the_target() -> None:
    # MACs fraction of a mask with equal-cost blocks: the fraction of runs
    frac = lambda m: float(m.bits.float().mean())  # noqa: E731
    m = schedules.random_equal_macs(DIT, 20, 0.5, frac, seed=3)
    assert abs(frac(m) - 0.5) <= 0.01 and bool(m.bits[0].all())
    assert m == schedules.random_equal_macs(DIT, 20, 0.5, frac, seed=3)
