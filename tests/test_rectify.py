"""Block graph and exact rectification: dependencies, liveness over steps, the live-set cache."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from archs import FAMILIES, randomize, small_unet
from maskc.models.dit import DiT
from test_equivalence import leaves_equal, reference_outputs, trajectory


def test_unet_graph_has_skip_connections() -> None:
    m = small_unet()
    g = maskc.block_graph(m)
    assert nx.is_directed_acyclic_graph(g)
    # down_blocks.0.resnets.0's output is a skip input of the last up block
    assert g.has_edge("down_blocks.0.resnets.0", "up_blocks.1.resnets.0")
    assert g.has_edge("down_blocks.1.attentions.0", "up_blocks.0.resnets.0")
    assert g.has_edge("input", "up_blocks.1.resnets.1")  # conv_in's output, through glue
    assert g.has_edge("up_blocks.1.resnets.1", "output")
    a = g.nodes["down_blocks.0.resnets.0"]
    assert a["type"] == "ResnetBlock2D" and a["shapes"] == [(1, 8, 8, 8)] and a["bytes"] == 8 * 8 * 8 * 4
    assert a["macs"] > 0 and g.graph["total_macs"] > sum(g.nodes[n].get("macs", 0) for n in g if n not in ("input", "output"))


def test_dit_residuals_are_edges() -> None:
    m = randomize(DiT(input_size=4, hidden_size=16, depth=2, num_heads=2), 0)
    g = maskc.block_graph(m)
    for u, v in [("blocks.0.attn", "blocks.0.mlp"), ("blocks.0.attn", "blocks.1.attn"), ("blocks.0.mlp", "blocks.1.attn"),
                 ("blocks.0.attn", "output"), ("input", "blocks.1.mlp")]:
        assert g.has_edge(u, v), (u, v)


def test_constructed_unet_case_turns_off_down_and_mid() -> None:
    m = small_unet()
    names = maskc.blocks(m)
    g = maskc.block_graph(m)
    T = 6
    bits = torch.ones(T, len(names), dtype=torch.bool)
    up = [j for j, n in enumerate(names) if n.startswith("up_blocks.")]
    bits[1::2, up] = False
    r = maskc.rectify(maskc.Mask(bits, names), g)
    for i in range(1, T, 2):
        for j, n in enumerate(names):
            assert bool(r.bits[i, j]) == False, (i, n)  # noqa: E712
    for i in range(0, T, 2):
        assert bool(r.bits[i].all())
    assert all(c.turned == "off" and c.rule == "dead" for c in r.changes)
    # and the compiled runtime agrees: at odd steps nothing runs but glue
    tm = maskc.compile(m, maskc.Mask(bits, names), example_args=(torch.randn(1, 2, 8, 8), torch.tensor(1)))
    assert tm.step_graph(1).runs == ()


@pytest.mark.parametrize("family", list(FAMILIES))
@given(data=st.data())
def test_exact_rectify_preserves_outputs(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 6), label="steps")
    bits = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=len(names), max_size=len(names)), min_size=steps, max_size=steps)),
        dtype=torch.bool,
    ).reshape(steps, len(names))
    args, kwargs = case.inputs(torch.zeros(case.shape), torch.tensor(1))
    g = maskc.block_graph(case.model, *args, **kwargs)
    r = maskc.rectify(maskc.Mask(bits, names), g)
    fixed = bits.clone()
    fixed[0] |= ~bits[0] & ~bits.all(0)
    # never turns on, except row 0 to fill an empty cache
    on = r.bits & ~bits
    assert not on[1:].any()
    assert torch.equal(on[0], fixed[0] & ~bits[0])
    assert {(c.step, c.block) for c in r.changes if c.turned == "on"} == {(0, names[j]) for j in on[0].nonzero().flatten().tolist()}
    assert all(c.rule == "empty-cache" for c in r.changes if c.turned == "on")
    # idempotent
    again = maskc.rectify(r, g)
    assert torch.equal(again.bits, r.bits) and again.changes == []
    # outputs unchanged: compiled rectified mask vs the hook reference of the (fixed) original
    expected = reference_outputs(case, fixed, names, steps)
    tm = maskc.compile(case.model, r)
    for i, (_, out) in enumerate(trajectory(case, tm, steps)):
        assert leaves_equal(out, expected[i]), f"step {i}"


def test_heuristic_rules_only_turn_off() -> None:
    m = small_unet()
    names = maskc.blocks(m)
    g = maskc.block_graph(m)
    bits = torch.ones(5, len(names), dtype=torch.bool)
    j = names.index("mid_block.attentions.0")
    bits[[1, 3], j] = False  # step 2: a run between two skips ...
    bits[2, [j - 1, j + 1]] = False  # ... with both neighbours skipped: isolated
    k = names.index("up_blocks.0.resnets.1")
    bits[[1, 3], k] = False  # between two skips too, but its neighbours run: kept
    stage = [k for k, n in enumerate(names) if n.startswith("up_blocks.1.")]
    bits[2, stage[:-1]] = False  # one block of up_blocks.1 left running at step 2
    r = maskc.rectify(maskc.Mask(bits, names), g, exact=False)
    rules = {(c.step, c.block): c.rule for c in r.changes}
    assert rules[(2, names[j])] == "isolated-run"
    assert (2, names[k]) not in rules
    assert rules[(2, names[stage[-1]])] == "stage-skipped"
    assert not (r.bits & ~bits).any()
    with pytest.raises(maskc.MaskcError, match="unknown"):
        maskc.rectify(maskc.Mask(bits, names), g, exact=False, rules=("nope",))


def test_cache_report_below_caching_every_block() -> None:
    m = small_unet()
    names = maskc.blocks(m)
    T = 8
    bits = torch.ones(T, len(names), dtype=torch.bool)
    deep = [j for j, n in enumerate(names) if not n.startswith(("down_blocks.0.", "up_blocks.1."))]
    bits[1::2, deep] = False  # DeepCache-like
    tm = maskc.compile(m, maskc.Mask(bits, names), example_args=(torch.randn(1, 2, 8, 8), torch.tensor(1)))
    rep = tm.cache_report()
    assert len(rep["per_step_bytes"]) == T
    assert 0 < rep["peak_bytes"] < rep["all_blocks_bytes"]
    # only the deepest block that feeds the shallow up-block is held: its output, not every block's
    assert rep["peak_bytes"] == sum(rep["block_bytes"][b] for b in tm.step_graph(1).reads)


def test_coarse_blocks_dead_branch_not_run() -> None:
    """With whole stages as blocks, skipping mid and the deepest up block kills the deepest down block."""
    m = small_unet()
    names = maskc.blocks(m, names=["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"])
    bits = torch.ones(3, 5, dtype=torch.bool)
    bits[1:, 2:4] = False
    tm = maskc.compile(m, maskc.Mask(bits, names), example_args=(torch.randn(1, 2, 8, 8), torch.tensor(1)))
    assert tm.step_graph(1).runs == ("down_blocks.0", "up_blocks.1")
    assert tm.step_graph(1).reads == ("up_blocks.0",)
    g = maskc.block_graph(m, torch.randn(1, 2, 8, 8), torch.tensor(1), blocks=names)
    r = maskc.rectify(maskc.Mask(bits, names), g)
    assert r.bits[1].tolist() == [True, False, False, False, True]


def test_first_run_of_a_later_skipped_block_is_kept_even_when_dead() -> None:
    """A block whose output nothing reads (here ``b``) loses every run but the first one that later rows skip:
    a skipped block must have run before (the empty-cache rule), so rectifying never makes a mask invalid.

    Planted: the first run dropped with the others (the tests on real models never reach it: every block
    runs at row 0 there, and every block of a full step feeds the output).
    """
    from maskc.passes.rectify import rectify_bits

    g = nx.DiGraph([("input", "a"), ("a", "output"), ("input", "b")])
    bits = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    out, changes = rectify_bits(bits, ["a", "b"], g)
    assert out[:, 0].all() and out[:, 1].tolist() == [True, False, False, False]
    assert [(c.step, c.block, c.turned, c.rule) for c in changes] == [(2, "b", "off", "dead")]
    again, more = rectify_bits(out, ["a", "b"], g)
    assert torch.equal(again, out) and more == []


def test_heuristic_rules_keep_a_blocks_first_run() -> None:
    """A run the heuristics would remove is kept when the block never ran before it: removing it would
    leave the cache it is read from empty, so the exact pass would have to turn a run on.

    Planted: the ``ran_before`` guard dropped from either rule.
    """
    from maskc.passes.rectify import heuristic_bits

    names = ["up_blocks.0.a", "up_blocks.0.b", "up_blocks.1.c", "up_blocks.1.d", "up_blocks.1.e"]
    bits = torch.ones(5, 5, dtype=torch.bool)
    bits[[0, 2], 2] = False  # c first runs at step 1, alone in time ...
    bits[1, [1, 3]] = False  # ... and in depth: isolated, but never ran before
    bits[3, 2] = False
    bits[2:4, 4] = False  # step 3: c and e skipped, d alone in its stage (it ran before: stage-skipped)
    bits[0, 0] = False  # a first runs at step 1, where b is skipped: alone in its stage
    out, changes = heuristic_bits(bits, names, ("isolated-run", "stage-skipped"))
    got = {(c.step, c.block, c.rule) for c in changes}
    assert out[1, 2] and out[1, 0], "a first run was turned off"
    assert (3, "up_blocks.1.d", "stage-skipped") in got
    assert not any(s == 1 for s, _, _ in got)
    assert not (out & ~bits).any()
