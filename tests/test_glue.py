"""Compiled glue (compile_unit="block"): the runs of glue between blocks are fused
(passes.segments) and compiled, shared by layers and steps; every step still equals the hook
reference bit for bit (a pass-through backend runs the pieces as dynamo hands them over), and
no program is ever compiled twice, however many steps, generations or input shapes come."""
from __future__ import annotations

import operator
import re
import warnings

import pytest
import torch
import torch._dynamo
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import maskc
from archs import FAMILIES, randomize, random_bits
from maskc.models.dit import DiT
from maskc.passes.segments import GLUE_PREFIX, glue_positions
from reference import HookReference
from test_backend import _recording
from test_backend_fn import _FEW
from test_equivalence import leaves_equal, reference_outputs, trajectory


def _work(n: torch.fx.Node) -> bool:
    return n.op in ("call_function", "call_method", "call_module") and n.target not in (operator.getitem, getattr)


@pytest.mark.parametrize("family", list(FAMILIES))
@_FEW
@given(data=st.data())
def test_fused_glue_steps_equal_reference(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 5), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    min_ops = data.draw(st.sampled_from([1, 3]), label="min_ops")
    expected = reference_outputs(case, bits, names, steps)
    torch._dynamo.reset()
    seen, backend = _recording()
    tm = maskc.compile(case.model, maskc.Mask(bits, names), backend=backend)
    tm._blocks.glue_min_ops = min_ops
    for gen in range(2):
        tm.reset()
        for i, (_, out) in enumerate(trajectory(case, tm, steps)):
            assert leaves_equal(out, expected[i]), f"generation {gen} step {i} differs; mask row {bits[i].int().tolist()}"
        if gen == 0:
            compiled = len(seen)
    assert len(seen) == compiled, "the second generation compiled again"
    where = glue_positions(tm._plan.capture.gm.graph)  # runs end at blocks, skipped or not
    for i in range(steps):
        glue = tm._plan.callables[i]
        run, at = 0, None
        for n in glue.graph.nodes:  # what is left outside the fused runs: fewer than min_ops in a row
            if isinstance(n.target, str) and n.target.startswith(("maskc_compiled_", GLUE_PREFIX)):
                run = 0
            elif _work(n):
                if where.get(n.name) != at:
                    run, at = 0, where.get(n.name)
                run += 1
                assert run < min_ops, f"step {i}: {run} operations in a row left unfused (min_ops={min_ops})\n{glue.code}"
            if n.op == "call_module" and n.target.startswith(GLUE_PREFIX):
                code = getattr(glue, n.target).eager.code
                names_used = set(re.findall(r"^\s*(\w+) = ", code, re.M)) | set(re.findall(r"self\.(\w+)", code))
                names_used |= set(re.search(r"def forward\(self, ([^)]*)\)", code).group(1).split(", "))
                assert all(re.fullmatch(r"[xvm]\d+", s) for s in names_used), f"not canonical:\n{code}"


def two_generations_equal(tm, ref, calls: list[tuple]) -> None:
    """Two generations of ``tm`` over ``calls`` (one per step) equal the hook reference's steps bit for bit."""
    with torch.no_grad():
        want = [ref(*c) for c in calls]
        for gen in range(2):
            tm.reset()
            for i, c in enumerate(calls):
                assert torch.equal(tm(*c), want[i]), f"generation {gen} step {i}"


def _dit(depth: int = 4):
    m = randomize(DiT(input_size=8, hidden_size=32, depth=depth, num_heads=2), 0)
    return m, maskc.blocks(m)


def test_glue_programs_are_shared_by_layers_and_steps() -> None:
    """A DiT of 4 layers, every block run: 9 glue runs (before the first block, between attention and
    MLP of each layer, between layers, after the last) but 4 programs; a 6-step mask that skips
    blocks reuses the same pieces (cut where skipped blocks stood): 11 programs, the four kinds of run
    in the variants dead-code elimination leaves of them (15 if runs were not cut there)."""
    m, names = _dit()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    seen, backend = _recording()
    tm = maskc.compile(m, maskc.Mask(torch.ones(2, len(names), dtype=torch.bool), names), backend=backend)
    with torch.no_grad():
        tm(x, torch.full((2,), 900.0), y)
    glue = tm._plan.callables[0]
    runs = [n for n in glue.graph.nodes if n.op == "call_module" and n.target.startswith(GLUE_PREFIX)]
    rep = tm.compile_report()
    assert len(runs) == 9 and rep["glue_programs"] == 4, (len(runs), rep)
    assert len(seen) == len(names) + 4

    g = torch.Generator().manual_seed(0)
    bits = torch.rand(6, len(names), generator=g) < 0.5
    bits[0] = True
    mask = maskc.Mask(bits, names)
    ref = HookReference(m, bits, names)
    seen, backend = _recording()
    tm = maskc.compile(m, mask, backend=backend)
    calls = [(x * (1 - 0.1 * i), torch.full((2,), 900.0 - 150 * i), y) for i in range(6)]
    with torch.no_grad():
        want = [ref(*c) for c in calls]
        got = [tm(*c) for c in calls]
    for i in range(6):
        assert torch.equal(got[i], want[i]), f"step {i}"
    distinct = len({id(tm.step_graph(i)) for i in range(6)})
    rep = tm.compile_report()
    assert distinct >= 4 and rep["glue_programs"] <= 11, (distinct, rep["glue_programs"])  # 15 if runs were not cut


def test_many_input_shapes_never_hit_the_recompile_limit() -> None:
    """Ten batch sizes through one TimestepModules (traces come and go): each block and glue program
    is compiled once per shape under a code object of its own, so dynamo never recompiles one and
    never reaches its limit of 8 entries per code object (a fullgraph compile would fail there)."""
    m, names = _dit(depth=2)
    bits = torch.tensor([[1] * len(names), [1, 0] * (len(names) // 2)], dtype=torch.bool)
    torch._dynamo.reset()
    counters.clear()
    seen, backend = _recording()
    tm = maskc.TimestepModules(m, maskc.Mask(bits, names), backend=backend, max_traces=2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        for b in range(1, 11):
            x, y = torch.randn(b, 1, 8, 8), torch.arange(b) % 10
            calls = [(x, torch.full((b,), 900.0), y), (x * 0.9, torch.full((b,), 500.0), y)]
            ref = HookReference(m, bits, names)
            want = [ref(*c) for c in calls]
            tm.reset()
            for i, c in enumerate(calls):
                assert torch.equal(tm(*c), want[i]), f"batch {b} step {i}"
    assert not counters["recompiles"], dict(counters["recompiles"])
    rep = tm.compile_report()
    assert rep["block_programs"] == 10 * len(names) and not rep["eager_blocks"] and not rep["eager_glue_programs"], rep


def test_a_backend_failure_runs_each_piece_eager_with_its_own_code() -> None:
    """A backend that fails on every graph: each block and glue run falls back to its own eager code with a
    warning, also the runs of other layers that share the failed program, and every step stays exact."""
    m, names = _dit()
    g = torch.Generator().manual_seed(1)
    bits = torch.rand(4, len(names), generator=g) < 0.5
    bits[0] = True
    ref = HookReference(m, bits, names)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    calls = [(x * (1 - 0.1 * i), torch.full((2,), 900.0 - 200 * i), y) for i in range(4)]

    def failing(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    torch._dynamo.reset()
    tm = maskc.compile(m, maskc.Mask(bits, names), backend=failing)
    with torch.no_grad(), pytest.warns(UserWarning, match="cannot be compiled as one graph.*BackendCompilerFailed"):
        want = [ref(*c) for c in calls]
        got = [tm(*c) for c in calls]
    for i in range(4):
        assert torch.equal(got[i], want[i]), f"step {i}"
    rep = tm.compile_report()
    assert set(rep["eager_blocks"]) == set(names) and rep["compiled_blocks"] == 0, rep
    assert rep["glue_programs"] >= 2 and rep["eager_glue_programs"] == rep["glue_programs"], rep


def test_blocks_given_tuples_of_tensors_are_compiled_once() -> None:
    """Coarse blocks (a U-Net's up blocks, as DeepCache caches) take a tuple of skip tensors: a program is
    keyed by the tensors' shapes inside it, not by their values, so each block compiles once for all steps."""
    from archs import small_unet

    m = small_unet(seed=0)
    names = maskc.blocks(m, names=["down_blocks.0", "up_blocks.0", "up_blocks.1"])
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(5, len(names), generator=g) < 0.5
    bits[0] = True
    seen, backend = _recording()
    tm = maskc.compile(m, maskc.Mask(bits, names), backend=backend)
    ref = HookReference(m, bits, names)
    xs = [(torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(i)), torch.tensor(900.0 - 200 * i)) for i in range(5)]
    with torch.no_grad():
        for i, x in enumerate(xs):
            assert torch.equal(tm(*x).sample, ref(*x).sample), f"step {i}"
    assert len({id(tm.step_graph(i)) for i in range(5)}) >= 3
    rep = tm.compile_report()
    assert rep["block_programs"] == len(names), rep


def test_glue_runs_differing_in_a_module_attribute_get_programs_of_their_own() -> None:
    """Layer 2's norm with another eps: the same glue code with other module attributes is another program
    (a shared one would be recompiled by dynamo whenever the layer changes), and every step stays exact."""
    m, names = _dit()
    norms = [mod for n, mod in m.blocks[2].named_modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert norms, "the DiT layer has no LayerNorm to change"
    for mod in norms:
        mod.eps = 1e-2
    bits = torch.ones(3, len(names), dtype=torch.bool)
    bits[1, ::2] = False
    ref = HookReference(m, bits, names)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    calls = [(x * (1 - 0.1 * i), torch.full((2,), 900.0 - 300 * i), y) for i in range(3)]
    torch._dynamo.reset()
    counters.clear()
    seen, backend = _recording()
    tm = maskc.compile(m, maskc.Mask(bits, names), backend=backend)
    two_generations_equal(tm, ref, calls)
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert len(seen) == tm.compile_report()["block_programs"] + tm.compile_report()["glue_programs"]
