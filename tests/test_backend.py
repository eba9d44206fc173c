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


def _recording():
    seen: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.append(gm)
        return gm.forward

    return seen, backend


def test_blocks_compiled_once_and_shared_by_every_step() -> None:
    """compile_unit="block": one compile per block however many distinct steps run it; none in a second generation."""
    m, mask, calls, want = _case()
    seen, backend = _recording()
    tm = maskc.compile(m, mask, backend=backend)
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.testing.assert_close(tm(*c), want[i], rtol=0, atol=0, msg=f"step {i}")
        distinct = len({id(tm.step_graph(i)) for i in range(len(calls))})
        ran = set().union(*(tm.step_graph(i).runs for i in range(len(calls))))
        assert distinct >= 3 and len(ran) == len(mask.names)
        rep = tm.compile_report()
        assert rep["block_programs"] == len(ran), f"{rep['block_programs']} block programs for {len(ran)} blocks over {distinct} distinct steps"
        assert len(seen) == len(ran) + rep["glue_programs"], f"{len(seen)} graphs compiled, report: {rep}"
        tm.reset()
        for i, c in enumerate(calls):
            torch.testing.assert_close(tm(*c), want[i], rtol=0, atol=0)
    assert len(seen) == len(ran) + rep["glue_programs"], "a second generation of the same shape compiled again"
    assert tm.compile_report()["compiled_blocks"] == len(ran) and not tm.compile_report()["eager_blocks"]


def test_step_unit_compiles_every_distinct_step() -> None:
    """compile_unit="step": each distinct step graph compiled whole, once; nothing recompiles."""
    m, mask, calls, want = _case()
    seen, backend = _recording()
    tm = maskc.compile(m, mask, backend=backend, compile_unit="step")
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.testing.assert_close(tm(*c), want[i], rtol=0, atol=0, msg=f"step {i}")
        distinct = len({id(tm.step_graph(i)) for i in range(len(calls))})
        assert distinct >= 3 and len(seen) == distinct, f"{len(seen)} graphs compiled for {distinct} distinct steps"
        tm.reset()
        for i, c in enumerate(calls):
            torch.testing.assert_close(tm(*c), want[i], rtol=0, atol=0)
    assert len(seen) == distinct


class _Branchy(torch.nn.Module):
    """A block with data-dependent control flow: dynamo cannot take it as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if bool(x.sum() > 0) else -self.lin(x)


class _TwoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + x


def test_a_block_with_a_graph_break_runs_eager_with_one_warning() -> None:
    torch.manual_seed(0)
    m = _TwoBlocks()
    names = ["a", "b"]
    bits = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    seen, backend = _recording()
    tm = maskc.compile(m, maskc.Mask(bits, names), backend=backend)
    ref = HookReference(m, bits, names)
    xs = [torch.randn(3, 4) for _ in range(3)]
    want = [ref(x) for x in xs]
    with pytest.warns(UserWarning, match="block 'b' cannot be compiled as one graph"):
        got = [tm(x) for x in xs]
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0, msg=f"step {i}")
    report = tm.compile_report()
    assert report["compiled_blocks"] == 1 and list(report["eager_blocks"]) == ["b"]


def test_compile_unit_is_checked() -> None:
    m, mask, _, _ = _case()
    with pytest.raises(maskc.MaskcError, match="compile_unit='graph'"):
        maskc.compile(m, mask, backend="inductor", compile_unit="graph")


@pytest.mark.slow
def test_inductor_matches_reference() -> None:
    from torch._dynamo.utils import counters

    m, mask, calls, want = _case()
    counters.clear()
    comp = maskc.compile(m, mask, backend="inductor")
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.testing.assert_close(comp(*c), want[i], rtol=1e-5, atol=1e-5, msg=f"step {i}")
    ran = set().union(*(comp.step_graph(i).runs for i in range(len(calls))))
    glue = comp.compile_report()["glue_programs"]
    assert glue >= 1 and counters["stats"]["unique_graphs"] == len(ran) + glue and len(ran) == len(mask.names), dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert sum(counters["inductor"].values()) > 0, "inductor produced nothing"
    comp.reset()
    with torch.no_grad():  # a second generation: no new graphs, no recompiles
        for i, c in enumerate(calls):
            torch.testing.assert_close(comp(*c), want[i], rtol=1e-5, atol=1e-5, msg=f"step {i}")
    assert counters["stats"]["unique_graphs"] == len(ran) + glue, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
