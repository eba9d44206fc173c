"""Compiling backends: the step graphs really go through torch.compile, and agree with the
reference semantics (not with maskc's own eager path) at every step."""
from __future__ import annotations

import pytest
import torch

import maskc
from archs import randomize
from maskc.models.dit import DiT
from reference import HookReference


def _case():
    m = randomize(DiT(input_size=8, hidden_size=32, depth=2, num_heads=2), 0)
    names = maskc.blocks(m)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[1:, 1] = False
    bits[2, :] = False  # a step reading every block: same-shaped reads, so their order matters
    bits[2, 0] = True
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    calls = [(x * (1 - 0.2 * i), torch.full((2,), 900.0 - 250 * i), y) for i in range(4)]
    ref = HookReference(m, bits, names)
    want = [ref(*c) for c in calls]
    return m, maskc.Mask(bits, names), calls, want


def test_backend_compiles_every_distinct_step() -> None:
    """A backend that records what dynamo hands it: every distinct step graph, and nothing recompiles."""
    m, mask, calls, want = _case()
    seen: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        seen.append(gm)
        return gm.forward

    tm = maskc.compile(m, mask, backend=recording_backend)
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.testing.assert_close(tm(*c), want[i], rtol=0, atol=0, msg=f"step {i}")
        distinct = len({id(tm.step_graph(i)) for i in range(len(calls))})
        assert distinct >= 3 and len(seen) == distinct, f"{len(seen)} graphs compiled for {distinct} distinct steps"
        tm.reset()
        for i, c in enumerate(calls):  # a second generation of the same shape: no new compiles
            torch.testing.assert_close(tm(*c), want[i], rtol=0, atol=0)
    assert len(seen) == distinct


@pytest.mark.slow
def test_inductor_matches_reference() -> None:
    from torch._dynamo.utils import counters

    m, mask, calls, want = _case()
    counters.clear()
    comp = maskc.compile(m, mask, backend="inductor")
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.testing.assert_close(comp(*c), want[i], rtol=1e-5, atol=1e-5, msg=f"step {i}")
    distinct = len({id(comp.step_graph(i)) for i in range(len(calls))})
    assert counters["stats"]["unique_graphs"] == distinct >= 3, dict(counters["stats"])
    assert sum(counters["inductor"].values()) > 0, "inductor produced nothing"
