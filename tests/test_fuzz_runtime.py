"""Live fuzzing of the runtime: random masks and random call sequences, checked call by call
against the hook reference (on its own copy of the model, built before maskc compiles).

A sequence mixes valid steps of a generation with resets, calls past T, and calls whose
inputs change mid-generation (batch size, resolution, dtype, device, timestep kind,
Python-number timesteps, other arguments). The oracle, for each call:

- past T: ``StepOverflowError``;
- at step 0: maskc answers (exactly like the reference) iff the model itself accepts the
  inputs, and raises a ``MaskcError`` otherwise;
- mid-generation, same kind of inputs (only tensor values, or only a Python-number
  timestep, differ): an exact answer;
- mid-generation, anything else changed: ``InputChangedError``.

Never an unrelated exception, never a silent wrong answer. The test also reports how
often the examples reached what matters (a masked step that skips blocks compared
exactly, an overflow, a refused change) and fails if they stop reaching it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import event, given
from hypothesis import strategies as st

import maskc
from archs import small_unet
from reference import HookReference, ReferenceOverflow

_MODEL = None
STATS: Counter = Counter()


def model():
    global _MODEL
    if _MODEL is None:
        _MODEL = small_unet()
    return _MODEL


CHANGES = ["batch", "resolution", "float64", "int64", "meta", "int-t", "float-t", "vector-t", "return_dict", "bad-kwarg"]


@st.composite
def generation_plan(draw: Any) -> tuple[torch.Tensor, list[tuple]]:
    names_n = len(maskc.blocks(model()))
    steps = draw(st.integers(2, 4), label="T")
    rows = [[True] * names_n]
    for _ in range(steps - 1):  # every later row skips something
        row = draw(st.lists(st.booleans(), min_size=names_n, max_size=names_n))
        row[draw(st.integers(0, names_n - 1))] = False
        rows.append(row)
    kinds = ["step"] * 7 + ["change"] * 3 + ["reset"]
    actions = draw(st.lists(st.tuples(st.sampled_from(kinds), st.sampled_from(CHANGES), st.integers(0, 2**16)),
                            min_size=3, max_size=14), label="actions")
    return torch.tensor(rows, dtype=torch.bool), actions


def _inputs(base: dict, change: str | None, seed: int) -> tuple[tuple, dict, tuple]:
    """Call arguments for one step and a description of their kind (what must stay fixed)."""
    g = torch.Generator().manual_seed(seed)
    n, hw, t = base["n"], base["hw"], base["t"]
    dtype, device, kwargs = torch.float32, "cpu", dict(base["kwargs"])
    if change == "batch":
        n = 3 - n
    elif change == "resolution":
        hw = 24 - hw
    elif change == "float64":
        dtype = torch.float64
    elif change == "int64":
        dtype = torch.int64
    elif change == "meta":
        device = "meta"
    elif change == "int-t":
        t = "int"
    elif change == "float-t":
        t = "float"
    elif change == "vector-t":
        t = "vector"
    elif change == "return_dict":
        kwargs["return_dict"] = not kwargs.get("return_dict", True)
    elif change == "bad-kwarg":
        kwargs["nonsense"] = 1
    x = (torch.randn(n, 2, hw, hw, generator=g) * 3).to(dtype).to(device)
    v = int(torch.randint(0, 1000, (1,), generator=g))
    tv = {"tensor": torch.tensor(v), "vector": torch.full((n,), v), "int": v, "float": float(v)}[t]
    kind = (tuple(x.shape), x.dtype, str(x.device), t, tuple(sorted(kwargs.items())))
    return (x, tv), kwargs, kind


def _equal(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return type(a) is type(b) and sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb))


@given(plan=generation_plan(), base_n=st.integers(1, 2), base_hw=st.sampled_from([8, 16]),
       base_t=st.sampled_from(["tensor", "vector", "int"]))
def _fuzz(plan, base_n, base_hw, base_t) -> None:
    bits, actions = plan
    m = model()
    names = maskc.blocks(m)
    ref = HookReference(m, bits, names)  # built first, on a copy: never sees maskc's calls
    tm = maskc.compile(m, maskc.Mask(bits, names))
    base = {"n": base_n, "hw": base_hw, "t": base_t, "kwargs": {}}
    gen_kind = gen_t = None
    STATS["examples"] += 1
    reached = set()
    for what, change, seed in actions:
        if what == "reset":
            tm.reset(), ref.reset()
            gen_kind = None
            continue
        args, kwargs, kind = _inputs(base, change if what == "change" else None, seed)
        step = tm.step
        if step >= bits.shape[0]:
            with pytest.raises(maskc.StepOverflowError):
                tm(*args, **kwargs)
            reached.add("overflow")
            continue
        same_kind = gen_kind is None or kind == gen_kind
        numbers_only = (gen_kind is not None and kind[:3] == gen_kind[:3] and kind[4] == gen_kind[4]
                        and kind[3] == gen_kind[3] == "int")
        try:
            want, model_ok = ref(*args, **kwargs), True
        except ReferenceOverflow:
            raise
        except Exception:  # noqa: BLE001 - the model itself refuses these inputs
            want, model_ok = None, False
        must_refuse = step > 0 and not (same_kind or numbers_only)
        try:
            got = tm(*args, **kwargs)
        except maskc.MaskcError as e:
            assert must_refuse or not model_ok, f"step {step}: maskc refused inputs the model accepts: {e}"
            if must_refuse and model_ok:
                assert isinstance(e, maskc.InputChangedError), f"step {step}: {type(e).__name__}: {e}"
            reached.add("refused-change" if isinstance(e, maskc.InputChangedError) else "refused-by-model")
            tm.reset(), ref.reset()  # the generation cannot go on consistently: start a new one
            gen_kind = None
            continue
        assert model_ok, f"step {step}: maskc answered where the model raised"
        assert not must_refuse, f"step {step}: inputs changed mid-generation ({kind} after {gen_kind}) were not refused"
        assert _equal(got, want), f"step {step}: silent wrong answer (mask row {bits[step].int().tolist()})"
        if step > 0:
            reached.add("skipping-step")
            if isinstance(args[1], int) and args[1] != gen_t:
                reached.add("new-number-timestep")
        if gen_kind is None:
            gen_kind, gen_t = kind, args[1]
    for r in sorted(reached):
        event(r)
        STATS[r] += 1
    ref.close()


def test_live_fuzz() -> None:
    STATS.clear()
    _fuzz()
    n = STATS["examples"]
    shares = {k: STATS[k] / n for k in ("skipping-step", "overflow", "refused-change", "refused-by-model",
                                        "new-number-timestep")}
    print(f"live fuzz over {n} examples: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    assert shares["skipping-step"] >= 0.6 and shares["overflow"] >= 0.2 and shares["refused-change"] >= 0.2, shares
    assert shares["new-number-timestep"] >= 0.1, shares
