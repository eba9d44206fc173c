"""What executes and what is cached, observed, against invariants derived independently of fx.

Outputs equal to the reference (test_equivalence) do not show that a skipped block did
not run, that dead glue and dead blocks were removed, or that the cache holds only what
a later step reads. Here forward hooks on the model's blocks record which blocks really
execute at each step, and three things are checked on random architectures and masks:

- a block the mask skips at step i never executes at step i;
- the blocks that execute are the ones exact rectification (``passes/rectify``, liveness
  on the networkx block graph, a separate algorithm from fx dead-code elimination)
  keeps; rectify may additionally keep a block's first run when later rows skip it;
- after each step the cache holds exactly the values some later step reads before the
  block runs again, every write is read later, and ``runs`` reports what executed.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from archs import FAMILIES, random_bits
from test_equivalence import leaves_equal, reference_outputs, trajectory


class ExecutionLog:
    """Forward hooks that only record which blocks ran, per call of the compiled module."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.steps: list[set[str]] = [set()]
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_m, _a, _out):
            self.steps[-1].add(name)

        return hook

    def next_step(self) -> None:
        self.steps.append(set())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _observe(case, tm, names, steps):
    """Run a generation through ``tm``; per step: outputs, executed blocks, cache after the step."""
    log = ExecutionLog(case.model, names)
    outs, caches = [], []
    try:
        for _, out in trajectory(case, tm, steps):
            outs.append(out)
            caches.append(set(tm.cache_entries()))
            log.next_step()
    finally:
        log.close()
    return outs, log.steps[:steps], caches


@pytest.mark.parametrize("family", list(FAMILIES))
@given(data=st.data())
def test_what_runs_and_what_is_cached(family: str, data) -> None:
    case = data.draw(FAMILIES[family](), label="case")
    names = maskc.blocks(case.model)
    steps = data.draw(st.integers(2, 6), label="steps")
    bits = random_bits(data.draw, steps, len(names))
    expected = reference_outputs(case, bits, names, steps)
    args, kwargs = case.inputs(torch.zeros(case.shape), torch.tensor(1))
    rect = maskc.rectify(maskc.Mask(bits, names), maskc.block_graph(case.model, *args, **kwargs)).bits
    tm = maskc.compile(case.model, maskc.Mask(bits, names))
    outs, ran, caches = _observe(case, tm, names, steps)
    first_run = {b: int(bits[:, j].nonzero()[0]) for j, b in enumerate(names)}
    for i in range(steps):
        assert leaves_equal(outs[i], expected[i]), f"step {i} differs from the reference"
        on = {b for j, b in enumerate(names) if bits[i, j]}
        kept = {b for j, b in enumerate(names) if rect[i, j]}
        sg = tm.step_graph(i)
        assert not ran[i] - on, f"step {i}: skipped blocks executed: {sorted(ran[i] - on)}"
        assert not ran[i] - kept, f"step {i}: dead blocks executed (rectify turns them off): {sorted(ran[i] - kept)}"
        missing = {b for b in kept - ran[i] if first_run[b] != i}
        assert not missing, f"step {i}: live blocks did not execute: {sorted(missing)}"
        assert set(sg.runs) == ran[i], f"step {i}: runs={sorted(sg.runs)} but executed {sorted(ran[i])}"
        assert set(sg.writes) <= ran[i] and not set(sg.reads) & ran[i]
        # the cache after step i: exactly the values a later step reads before the block runs again
        wanted = set()
        for b in names:
            for j in range(i + 1, steps):
                if b in tm.step_graph(j).reads:
                    wanted.add(b)
                    break
                if b in ran[j]:
                    break
        assert caches[i] == wanted, f"after step {i}: cache holds {sorted(caches[i])}, later steps read {sorted(wanted)}"
        for b in sg.writes:
            assert b in wanted, f"step {i} writes {b}, which no later step reads"
    during = [len(({*caches[i - 1]} if i else set()) | set(tm.step_graph(i).writes)) for i in range(steps)]
    assert tm.peak_cache_entries == max(during), "peak cache entries: held before a step plus its writes"
