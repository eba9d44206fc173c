"""``torch.compile(model, backend=maskc.backend(mask))``: every step equals the hook reference,
bit for bit with inner="eager", on random architectures of all five families and random masks;
within float32 round-off with inner="inductor"; steps counted outside the traced code (one
graph, no recompiles), generations bounded by maskc.reset or by wrap-around after T calls."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import maskc
from archs import FAMILIES, random_bits, small_unet
from test_equivalence import leaves_equal, reference_outputs, trajectory

# dynamo traces each drawn model afresh (about a second): a fifth of the profile's examples per family
_FEW = settings(max_examples=max(3, settings.default.max_examples // 5))


@pytest.mark.parametrize("family", list(FAMILIES))
@_FEW
@given(data=st.data())
def test_backend_steps_equal_reference(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 5), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    expected = reference_outputs(case, bits, names, steps)
    torch._dynamo.reset()  # every drawn model is a new instance of a few classes: no recompile limit
    counters.clear()
    be = maskc.backend(maskc.Mask(bits, names))
    compiled = torch.compile(case.model, backend=be, fullgraph=True, dynamic=False)
    for gen in range(2):  # the second generation starts by wrap-around, with no reset
        for i, (_, out) in enumerate(trajectory(case, compiled, steps)):
            assert leaves_equal(out, expected[i]), f"generation {gen} step {i} differs; mask row {bits[i].int().tolist()}"
    assert set(be.blocks_found) == set(names), f"blocks not found in dynamo's graph: {set(names) - set(be.blocks_found)}"
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], (dict(counters["stats"]), dict(counters["recompiles"]))


def _unet_case(steps: int = 12, seed: int = 0):
    m = small_unet(seed=seed)
    names = maskc.blocks(m)
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(steps, len(names), generator=g) < 0.5
    bits[0] = True
    return m, names, bits


def test_reset_mid_generation_and_wrap_around() -> None:
    m, names, bits = _unet_case(steps=4)
    from reference import HookReference

    xs = [(torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(i)), torch.tensor(900.0 - 200 * i)) for i in range(4)]
    ref = HookReference(m, bits, names)
    with torch.no_grad():
        want = [ref(*x).sample for x in xs]
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=maskc.backend(maskc.Mask(bits, names)), fullgraph=True)
    with torch.no_grad():
        compiled(*xs[0]), compiled(*xs[1])  # an interrupted generation
        maskc.reset(compiled)
        got = [compiled(*x).sample for x in xs] + [compiled(*x).sample for x in xs]  # then two, the second by wrap-around
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % 4]), f"call {i}"
    with pytest.raises(maskc.MaskcError, match="maskc.reset got"):
        maskc.reset(torch.compile(m))


@pytest.mark.slow
def test_random_12_step_mask_inductor_and_backend_agree_with_reference() -> None:
    """The issue's acceptance case: a trained-like U-Net, a random 12-step mask (12 distinct variants),
    maskc.compile(backend="inductor") and torch.compile(backend=maskc.backend(mask, inner="inductor"))
    within 1e-3 of the reference at every step."""
    from diffusers import DDIMScheduler

    from reference import HookReference

    m, names, bits = _unet_case(steps=12, seed=3)
    mask = maskc.Mask(bits, names)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(12)
    x0 = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(fn):
        x, outs = x0.clone(), []
        with torch.no_grad():
            for t in sched.timesteps:
                eps = fn(x, t).sample
                outs.append(eps)
                x = sched.step(eps, t, x).prev_sample
        return outs

    want = run(HookReference(m, bits, names))
    torch._dynamo.reset()
    tm = maskc.compile(m, mask, backend="inductor")
    got_tm = run(tm)
    assert len({id(tm.step_graph(i)) for i in range(12)}) == 12, "expected 12 distinct step variants"
    compiled = torch.compile(m, backend=maskc.backend(mask, inner="inductor"), fullgraph=True)
    got_be = run(compiled)
    for i in range(12):
        torch.testing.assert_close(got_tm[i], want[i], rtol=1e-3, atol=1e-3, msg=f"maskc.compile step {i}")
        torch.testing.assert_close(got_be[i], want[i], rtol=1e-3, atol=1e-3, msg=f"maskc.backend step {i}")
