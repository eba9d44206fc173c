"""cuda_graphs=True: the static-buffer plan (passes.buffers) and the steps that run over it.

Capture and replay need a GPU (benchmarks/gpu.py checks them when one is lent); everything
else runs here on CPU: the slot plan never lets two live entries share storage, and a
generation over the static buffers equals the hook reference bit for bit on random
architectures and masks, with slots shared wherever the plan allows."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from archs import FAMILIES, random_bits, small_unet
from maskc.passes.buffers import live_intervals, plan_buffers
from test_equivalence import leaves_equal, reference_outputs, trajectory


def _run_static(case, mask, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CUDA graph is captured" on CPU
        tm = maskc.compile(case.model, mask, cuda_graphs=True)
        outs = [out for _, out in trajectory(case, tm, steps)]
    return tm, outs


@pytest.mark.parametrize("family", ["unet2d", "dit"])
@given(data=st.data())
def test_static_buffers_equal_reference(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 7), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    expected = reference_outputs(case, bits, names, steps)
    tm, outs = _run_static(case, maskc.Mask(bits, names), steps)
    for i, out in enumerate(outs):
        assert leaves_equal(out, expected[i]), f"step {i} differs; mask row {bits[i].int().tolist()}"
    plan = tm.cache_report().get("static")
    assert plan is not None and plan["static_cache_bytes"] <= plan["static_cache_bytes_unshared"]


@given(data=st.data())
def test_slot_plan_never_shares_live_storage(data) -> None:
    """No two blocks in one slot have meeting intervals; equal specs only; every cached block has a slot."""
    m = small_unet()
    names = maskc.blocks(m)
    steps = data.draw(st.integers(2, 12), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    tm = maskc.compile(m, maskc.Mask(bits, names), example_args=(torch.randn(1, 2, 8, 8), torch.tensor(10)))
    sched = tm._plan.schedule
    nodes = {n.meta["maskc_block"]: n for n in tm._plan.capture.gm.graph.nodes if "maskc_block" in n.meta}
    cached = {b for sg in sched.steps for b in sg.writes}
    specs = {b: (tuple(nodes[b].meta["maskc_out_shapes"][0]), tuple(nodes[b].meta["maskc_out_strides"][0]),
                 nodes[b].meta["maskc_out_dtypes"][0]) for b in cached}
    plan = plan_buffers(sched, specs, {b: 1 for b in cached})
    assert set(plan.slot_of) == cached
    iv = live_intervals(sched)
    for a in cached:
        for b in cached:
            if a < b and plan.slot_of[a] == plan.slot_of[b]:
                assert specs[a] == specs[b]
                assert not any(s1 <= e2 and s2 <= e1 for s1, e1 in iv[a] for s2, e2 in iv[b]), (a, iv[a], b, iv[b])
    # every read at step i is of an entry whose interval covers i
    for i, sg in enumerate(sched.steps):
        for b in sg.reads:
            assert any(s <= i <= e for s, e in iv[b]), (b, i, iv[b])


def test_lifetimes_that_touch_do_not_share() -> None:
    """An entry last read at step i and one written at step i must not share a slot (step i would clobber it)."""
    class Sg:
        def __init__(self, reads, writes):
            self.reads, self.writes = reads, writes

    class Sched:
        steps = [Sg((), ("a",)), Sg(("a",), ("b",)), Sg(("b",), ()), Sg((), ("c",)), Sg(("c",), ())]

    plan = plan_buffers(Sched(), {"a": 1, "b": 1, "c": 1}, {"a": 4, "b": 4, "c": 4})
    assert plan.slot_of["a"] != plan.slot_of["b"]  # a: [0, 1], b: [1, 2] meet at step 1
    assert plan.slot_of["c"] in (plan.slot_of["a"], plan.slot_of["b"])  # c: [3, 4] meets neither
    assert (plan.bytes_shared, plan.bytes_unshared) == (8, 12)


def test_cpu_warns_once_and_reports_the_plan() -> None:
    m = small_unet()
    names = maskc.blocks(m)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[1::2, 1:-1] = False
    tm = maskc.compile(m, maskc.Mask(bits, names), cuda_graphs=True)
    with pytest.warns(UserWarning, match="no CUDA graph is captured") as rec:
        with torch.no_grad():
            for i in range(4):
                tm(torch.randn(1, 2, 8, 8), torch.tensor(900 - 200 * i))
    assert len([r for r in rec if "CUDA graph" in str(r.message)]) == 1
    rep = tm.cache_report()["static"]
    assert rep["cuda_graphs"] == 0 and rep["static_slots"] >= 1 and rep["static_input_bytes"] > 0
