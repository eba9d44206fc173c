"""Every step of a compiled mask equals the hook reference, bit for bit, on random
architectures of all five families and random masks over a DDIM trajectory."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from diffusers import DDIMScheduler
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import maskc
from archs import FAMILIES, Case, random_bits
from reference import HookReference


def trajectory(case: Case, fn, steps: int, seed: int = 0):
    """Run a DDIM sampling loop with ``fn`` as the backbone; yield (inputs, output) per step."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed))
    for t in sched.timesteps:
        args, kwargs = case.inputs(x, t)
        with torch.no_grad():
            out = fn(*args, **kwargs)
        yield (args, kwargs), out
        x = sched.step(case.eps(out), t, x).prev_sample


def reference_outputs(case: Case, bits: torch.Tensor, names: list[str], steps: int) -> list:
    """Outputs of the hook reference of mask ``bits`` along the DDIM trajectory of ``case``."""
    ref = HookReference(case.model, bits, names)
    try:
        return [out for _, out in trajectory(case, ref, steps)]
    finally:
        ref.close()


def leaves_equal(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or type(a) is not type(b):
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


@pytest.mark.parametrize("family", list(FAMILIES))
@given(data=st.data())
def test_masked_steps_equal_reference(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 6), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    mask = maskc.Mask(bits, names)
    expected = reference_outputs(case, bits, names, steps)
    tm = maskc.compile(case.model, mask)
    for i, (_, out) in enumerate(trajectory(case, tm, steps)):
        assert leaves_equal(out, expected[i]), f"step {i} differs; mask row {bits[i].int().tolist()}"
    assert tm.step == steps
    assert tm.cache_entries() == [], "the cache must be empty once nothing reads it any more"


@pytest.mark.parametrize("family", list(FAMILIES))
@given(data=st.data())
def test_full_mask_reproduces_original(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = 3
    expected = [out for _, out in trajectory(case, case.model, steps)]
    tm = maskc.compile(case.model, maskc.Mask.full(steps, names))
    for i, (_, out) in enumerate(trajectory(case, tm, steps)):
        assert leaves_equal(out, expected[i]), f"step {i} differs with nothing skipped"


def _flops(fn, *args, **kwargs) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn(*args, **kwargs)
    return fc.get_total_flops(), fc.get_flop_counts()


@pytest.mark.parametrize("family", list(FAMILIES))
@given(data=st.data())
def test_skipped_blocks_flops_vanish(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 5), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    x = torch.randn(case.shape)
    t = torch.tensor(500)
    args, kwargs = case.inputs(x, t)
    full, per_module = _flops(case.model, *args, **kwargs)
    root = type(case.model).__name__
    block_flops = [sum(per_module.get(f"{root}.{n}", {}).values()) for n in names]
    tm = maskc.compile(case.model, maskc.Mask(bits, names), example_args=args, example_kwargs=kwargs)
    for i in range(steps):
        got, _ = _flops(tm, *args, **kwargs)
        skipped = sum(f for f, b in zip(block_flops, bits[i].tolist()) if not b)
        assert got <= full - 0.9 * skipped, f"step {i}: {got} FLOPs, full {full}, skipped blocks {skipped}"
        if bits[i].all():
            assert got == full


@pytest.mark.parametrize("family", ["unet2d", "unet2d_cond"])
@given(data=st.data())
def test_coarse_blocks_equal_reference(family: str, data) -> None:
    """Whole down/mid/up blocks as blocks (DeepCache's granularity): tuple outputs, skip lists."""
    case = data.draw(FAMILIES[family](), label="case")
    m = case.model
    names = [f"down_blocks.{k}" for k in range(len(m.down_blocks))]
    names += ["mid_block"] if m.mid_block is not None else []
    names += [f"up_blocks.{k}" for k in range(len(m.up_blocks))]
    names = maskc.blocks(m, names=names)
    steps = data.draw(st.integers(2, 5), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    expected = reference_outputs(case, bits, names, steps)
    tm = maskc.compile(m, maskc.Mask(bits, names))
    for i, (_, out) in enumerate(trajectory(case, tm, steps)):
        assert leaves_equal(out, expected[i]), f"step {i} differs; mask row {bits[i].int().tolist()}"
