"""Compiled pieces called without dynamo (runtime._Direct): after a piece's first call, its
compiled graph is called directly with the inputs dynamo would pass. Each test makes one thing
the direct call must notice: a changed number, grad mode, an in-place write, outputs that are not
all tensors; each piece runs on a pass-through backend (the graph dynamo hands over, run as is),
so every result must equal the block's own eager output bit for bit."""
from __future__ import annotations

import pytest
import torch

import maskc
from maskc.passes.segments import GLUE_PREFIX
from maskc.runtime import _BlockCompiler, _Compiled, _call_block


def _graph_calls():
    calls: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        def run(*a):
            calls.append(1)
            return gm.forward(*a)
        return run

    return calls, backend


def _piece(block: torch.nn.Module, backend) -> _Compiled:
    torch._dynamo.reset()
    owner = _BlockCompiler(backend)
    return _Compiled(owner, "block 'b'", ("block", "b", id(block)), _call_block, block, block)


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, k: float, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.lin(x) * k
        return y if bias is None else y + bias


def test_later_calls_skip_dynamo_and_equal_the_block() -> None:
    """After the first call dynamo is not entered again (its program is gone, and nothing fails), and
    each result is the block's own, for new tensors every call."""
    torch.manual_seed(0)
    block = Scale()
    calls, backend = _graph_calls()
    p = _piece(block, backend)
    xs = [torch.randn(3, 4) for _ in range(4)]
    b = torch.randn(4)
    with torch.no_grad():
        assert torch.equal(p(xs[0], 2.0, bias=b), block(xs[0], 2.0, bias=b))
        assert p.direct, "the first call did not set up the direct call"
        p.program.dynamo = None  # any later call through dynamo would fail
        for x in xs[1:]:
            assert torch.equal(p(x, 2.0, bias=b), block(x, 2.0, bias=b))
    assert len(calls) == 2 + 3  # first call: dynamo's run and the check; then one per call
    assert p.owner.report()["direct_pieces"] == 1


def test_a_changed_number_or_structure_goes_through_dynamo() -> None:
    """Dynamo specialized the graph to k=2.0 and to bias given: a call with k=3.0 or without bias is
    dynamo's to recompile; the direct call must not answer it with the graph made for the first."""
    torch.manual_seed(1)
    block = Scale()
    _, backend = _graph_calls()
    p = _piece(block, backend)
    x, b = torch.randn(3, 4), torch.randn(4)
    with torch.no_grad():
        p(x, 2.0, bias=b)
        p(x, 2.0, bias=b)
        assert torch.equal(p(x, 3.0, bias=b), block(x, 3.0, bias=b))
        assert torch.equal(p(x, 2.0, bias=None), block(x, 2.0))
        assert torch.equal(p(x, 2.0, bias=b), block(x, 2.0, bias=b))


def test_grad_mode_changed_after_the_first_call() -> None:
    """First called under no_grad, aot_autograd makes an inference graph; with grad on, the result must
    carry its autograd graph (dynamo compiles one for grad mode), not be the inference graph's."""
    torch.manual_seed(2)
    block = Scale()
    p = _piece(block, "aot_eager")
    x = torch.randn(3, 4)
    with torch.no_grad():
        p(x, 2.0)
        p(x, 2.0)
    xg = x.clone().requires_grad_()
    out = p(xg, 2.0)
    assert out.requires_grad, "grad mode changed, but the direct call ran the no_grad graph"
    out.sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad, torch.full_like(x, 2.0) @ block.lin.weight)


class Doubles(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


def test_a_block_that_writes_its_input_writes_it_once() -> None:
    """The first call checks the direct call by running the graph again: a graph with in-place
    operations is not run twice (its input would be doubled twice) and stays with dynamo."""
    _, backend = _graph_calls()
    p = _piece(Doubles(), backend)
    x = torch.ones(3)
    with torch.no_grad():
        out = p(x)
        assert torch.equal(x, torch.full((3,), 2.0)), f"the input was written more than once: {x}"
        assert torch.equal(out, torch.full((3,), 3.0))
        assert p.direct is False
        assert torch.equal(p(x), torch.full((3,), 5.0))


class PassesOn(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x, x * 2


def test_a_block_that_hands_back_its_input_stays_with_dynamo() -> None:
    """Dynamo returns an input handed back as is outside the graph, so the graph has one output for two
    returned tensors: the first call's check sees that the direct call would not give the same result."""
    _, backend = _graph_calls()
    p = _piece(PassesOn(), backend)
    with torch.no_grad():
        for k in range(3):
            x = torch.full((2,), float(k))
            a, b = p(x)
            assert a is x and torch.equal(b, x * 2)
    assert p.direct is False


class Mixed(torch.nn.Module):
    def forward(self, x: torch.Tensor, skips: tuple[torch.Tensor, ...]):
        return x * 2, None, 3, (x + skips[0], skips[1] - x)


def test_outputs_that_are_not_all_tensors_keep_their_structure() -> None:
    """A block returning a tuple with None, a number and a nested tuple (a U-Net down block returns
    its output and a tuple of skips): the direct call rebuilds the same structure."""
    _, backend = _graph_calls()
    block = Mixed()
    p = _piece(block, backend)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            x, s = torch.randn(2, 3, generator=g), (torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g))
            got, want = p(x, s), block(x, s)
            assert type(got) is tuple and got[1:3] == (None, 3) and type(got[3]) is tuple
            assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[3], want[3]))
    assert p.direct


class Layers(torch.nn.Module):
    """Pre-norm residual layers whose blocks are the MLPs: the glue around each (a LayerNorm with its own
    weights, a scale and a shift) is the same code in every layer, so the layers share its program."""

    def __init__(self, depth: int = 3, width: int = 8) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(depth))
        self.mlps = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.GELU(), torch.nn.Linear(16, width)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x) * 2.0 + 1.0)
        return x


def _layers_case():
    from archs import randomize

    m = randomize(Layers(), 0)
    names = maskc.blocks(m, names=[f"mlps.{i}" for i in range(3)])
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    return m, names, [(x * (1 - 0.1 * i),) for i in range(4)]


def _dit_case():
    from archs import randomize
    from maskc.models.dit import DiT

    m = randomize(DiT(input_size=8, hidden_size=32, depth=3, num_heads=2), 0)
    x, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 2])
    return m, maskc.blocks(m), [(x * (1 - 0.1 * i), torch.full((2,), 900.0 - 200 * i), y) for i in range(4)]


@pytest.mark.parametrize("case", ["layers", "dit"])
@pytest.mark.parametrize("direct", [True, False])
def test_steps_with_and_without_direct_calls_are_identical(case: str, direct: bool) -> None:
    """Under a 4-step mask, compiled by blocks (pass-through backend), two generations equal the hook
    reference bit for bit whether the pieces call their graphs directly or through dynamo, and most
    pieces do call directly: pre-norm layers sharing one glue program (each with its own norm
    weights), and a DiT."""
    from reference import HookReference
    from test_glue import two_generations_equal

    m, names, calls = _layers_case() if case == "layers" else _dit_case()
    bits = torch.rand(4, len(names), generator=torch.Generator().manual_seed(4)) < 0.5
    bits[0] = True
    ref = HookReference(m, bits, names)
    _, backend = _graph_calls()
    torch._dynamo.reset()
    tm = maskc.compile(m, maskc.Mask(bits, names), backend=backend)
    tm._blocks.direct = direct
    two_generations_equal(tm, ref, calls)
    rep = tm.compile_report()
    pieces = sum(isinstance(mod, _Compiled) for fn in tm._plan.callables for mod in fn.modules())
    if direct:
        assert rep["direct_pieces"] >= pieces // 2, (rep, pieces)
    else:
        assert rep["direct_pieces"] == 0
    if case == "layers":
        runs = {id(mod) for fn in tm._plan.callables for n, mod in fn.named_children() if n.startswith(GLUE_PREFIX)}
        assert rep["glue_programs"] < len(runs), f"the layers' {len(runs)} glue runs share no program"
