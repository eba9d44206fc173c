"""``maskc.backend(mask)``: the mask as a torch.compile backend.

    compiled = torch.compile(model, backend=maskc.backend(mask))   # or inner="inductor"
    for t in timesteps: compiled(x, t)        # step i of the generation runs mask row i
    maskc.reset(compiled)                     # start the next generation

Dynamo hands the backend the model's graph with every module inlined. The backend
outlines each block of ``mask.names`` into one node (``passes.outline``, found through
``node.meta["nn_module_stack"]``), then the same ``passes.schedule`` and
``passes.rewrite`` that ``maskc.compile`` uses make one step graph per mask row. What it
returns to dynamo is a callable that counts calls *outside* the traced code, so dynamo
sees one graph and never recompiles across steps; the callable picks step i's graph,
feeds it the cached block outputs it reads and keeps the ones later steps read.

Generations: ``maskc.reset(compiled)`` (or ``backend.reset()``) starts a new one; after
T calls the next call starts a new one by itself (wrap-around), so a loop of exactly T
steps per generation needs no reset. A call count that is not a multiple of T without
resets (an interrupted generation) misaligns the steps: call ``maskc.reset``.

``inner`` compiles the pieces: "eager" runs the step graphs as they are; any other
torch.compile backend (e.g. "inductor") compiles each block and each distinct glue run once,
shared by every step (``compile_unit="block"``), or each distinct step graph whole (``"step"``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from maskc.errors import MaskcError
from maskc.mask import Mask
from maskc.passes.outline import outline_blocks
from maskc.passes.schedule import check_reads_filled, schedule
from maskc.runtime import COMPILE_UNITS, _BlockCompiler, _Plan, run_step

__all__ = ["MaskBackend", "backend", "reset"]


@dataclass
class _Blocks:
    """What ``passes.schedule`` reads of a capture."""

    gm: torch.fx.GraphModule
    block_nodes: dict[str, str]


class _Runner:
    """The callable dynamo gets for one graph: step counter, cache, one step graph per mask row."""

    def __init__(self, gm: torch.fx.GraphModule, block_nodes: dict[str, str], mask: Mask, inner: Any,
                 blocks: _BlockCompiler | None) -> None:
        cap = _Blocks(gm, block_nodes)
        self.blocks_found = tuple(block_nodes)
        self.plan = _Plan(cap, schedule(cap, mask.bits, mask.names), inner, blocks)  # type: ignore[arg-type]
        self.steps = mask.steps
        self.step = 0
        self.cache: dict[str, Any] = {}

    def reset(self) -> None:
        self.step = 0
        self.cache.clear()

    def __call__(self, *args: Any) -> Any:
        if self.step >= self.steps:  # wrap-around: T calls make a generation
            self.reset()
        outs, _ = run_step(self.plan, self.step, list(args), self.cache)
        self.step += 1
        return tuple(outs)


class MaskBackend:
    """A torch.compile backend that runs ``mask`` (see the module docstring)."""

    def __init__(self, mask: Mask, inner: str | Callable = "eager", compile_unit: str = "block") -> None:
        if not isinstance(mask, Mask):
            raise MaskcError(f"expected a maskc.Mask, got {type(mask).__name__}; build one with maskc.Mask(bits, names)")
        if compile_unit not in COMPILE_UNITS:
            raise MaskcError(f"compile_unit={compile_unit!r}: expected one of {COMPILE_UNITS}")
        check_reads_filled(mask.bits, mask.names)
        self.mask = mask
        self.inner = inner
        self.compile_unit = compile_unit
        self._blocks = _BlockCompiler(inner) if inner != "eager" and compile_unit == "block" else None
        self._runners: list[weakref.ref[_Runner]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        gm, block_nodes = outline_blocks(gm, self.mask.names)
        runner = _Runner(gm, block_nodes, self.mask, self.inner, self._blocks)
        self._runners = [r for r in self._runners if r() is not None] + [weakref.ref(runner)]
        return runner

    def runners(self) -> list[_Runner]:
        """One per graph dynamo compiled (a graph break or a new input shape makes another)."""
        return [r for r in (w() for w in self._runners) if r is not None]

    @property
    def blocks_found(self) -> tuple[str, ...]:
        """Blocks of the mask found in the graphs compiled so far."""
        return tuple(dict.fromkeys(b for r in self.runners() for b in r.blocks_found))

    def reset(self) -> None:
        """Start a new generation: every graph's step counter to 0, caches emptied."""
        for r in self.runners():
            r.reset()


def backend(mask: Mask, inner: str | Callable = "eager", compile_unit: str = "block") -> MaskBackend:
    """``torch.compile(model, backend=maskc.backend(mask))`` runs ``mask``, one row per call."""
    return MaskBackend(mask, inner, compile_unit)


def reset(compiled: Any) -> None:
    """Start a new generation of ``compiled``: a TimestepModules, a MaskBackend, or torch.compile(model, backend=maskc.backend(...))."""
    from maskc.runtime import TimestepModules

    if isinstance(compiled, (TimestepModules, MaskBackend)):
        compiled.reset()
        return
    ctx = getattr(compiled, "dynamo_ctx", None)  # what torch.compile(model) returns (an OptimizedModule) has one
    if ctx is not None and hasattr(ctx, "callback"):
        from torch._dynamo.eval_frame import innermost_backend

        be = innermost_backend(ctx.callback)
        be = getattr(be, "compiler_fn", be)  # torch.compile wraps a callable backend in _TorchCompileWrapper
        if isinstance(be, MaskBackend):
            be.reset()
            return
    raise MaskcError(
        f"maskc.reset got {type(compiled).__name__}: expected what maskc.compile returns, a maskc.backend(...) object, "
        "or torch.compile(model, backend=maskc.backend(mask)); keep the backend object and call its reset() otherwise"
    )
