"""Static buffers and maskc-owned CUDA graphs for the steps of one trace.

With ``maskc.compile(..., cuda_graphs=True)`` a generation runs over buffers that never
move: the flat tensor inputs are copied into static input buffers, the cache lives in
static slots planned by ``passes.buffers`` (one per cached block; blocks of equal shape
whose lifetimes never meet share one), each step variant copies the blocks it writes
into their slots and reads the ones it skips from theirs. On CUDA every distinct step
variant is captured once as a ``torch.cuda.CUDAGraph`` (all of a trace's graphs share one
memory pool) and each step is one replay; the outputs a step returns are the graph's
static outputs, valid until that variant replays again (consume them before the next
call, as a sampling loop does). CUDA graph trees are not used: they would overwrite
outputs kept from one call by the next (torch #176294), which is what the cache is.

Elsewhere (CPU) the same buffers run without capture, which is how the tests check the
buffer plan. A capture that fails falls back to the buffers without capture, with one
warning.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from maskc.passes.buffers import BufferPlan, plan_buffers

__all__ = ["StaticSteps", "static_support"]


def _cached_meta(plan: Any) -> dict[str, dict]:
    """Capture metadata (output shapes, strides, dtypes, bytes) of every block some step of ``plan`` caches."""
    meta = {n.meta["maskc_block"]: n.meta for n in plan.capture.gm.graph.nodes if "maskc_block" in n.meta}
    return {b: meta[b] for b in {b for sg in plan.schedule.steps for b in sg.writes}}


def static_support(plan: Any) -> str | None:
    """Why ``plan`` cannot run over static buffers (a cached block that returns other than one tensor), or None."""
    bad = sorted(b for b, m in _cached_meta(plan).items() if not m.get("maskc_out_is_tensor", False))
    return f"cached blocks {bad} return something other than one tensor" if bad else None


def _strides(meta: dict) -> tuple[int, ...]:
    """The block output's strides, or contiguous ones where it is an expanded view (a copy cannot fill those)."""
    shape, stride = meta["maskc_out_shapes"][0], tuple(meta["maskc_out_strides"][0])
    if 0 in stride or len(stride) != len(shape):
        return tuple(torch.empty(shape, device="meta").stride())
    return stride


class StaticSteps:
    """One trace's steps over static input, cache and output buffers; CUDA graphs on CUDA."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        meta = _cached_meta(plan)
        specs = {b: (tuple(m["maskc_out_shapes"][0]), _strides(m), m["maskc_out_dtypes"][0]) for b, m in meta.items()}
        nbytes = {b: int(m["maskc_out_bytes"]) for b, m in meta.items()}
        self.buffers: BufferPlan = plan_buffers(plan.schedule, specs, nbytes)
        self.slots: list[torch.Tensor] | None = None
        self.static_in: list[torch.Tensor] | None = None
        self.device: torch.device | None = None
        self.graphs: dict[int, tuple[Any, list[Any]]] = {}  # id(step graph) -> (CUDAGraph, static outputs)
        self.pool: Any = None
        self.pool_bytes = 0
        self.failed: str | None = None

    @property
    def capturing(self) -> bool:
        return self.failed is None and self.device is not None and self.device.type == "cuda"

    def _prepare(self, tensors: list[torch.Tensor]) -> None:
        dev = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device if tensors else torch.device("cpu"))
        self.device = dev
        # on CUDA, CPU inputs (a timestep tensor) get a device buffer: a graph cannot capture a pageable copy
        self.static_in = [t.detach().to(dev, copy=True) for t in tensors]
        # each slot has its blocks' strides: a block that returns a non-contiguous view is read back with the same
        # layout, so the kernels after it (and their float results) are the ones the original runs
        self.slots = [torch.empty_strided(shape, stride, dtype=dtype, device=dev) for shape, stride, dtype in self.buffers.slot_spec]

    def __call__(self, i: int, tensors: list[torch.Tensor]) -> list[Any]:
        if self.static_in is None:
            self._prepare(tensors)
        assert self.static_in is not None and self.slots is not None
        for s, t in zip(self.static_in, tensors):
            s.copy_(t, non_blocking=True)
        sg, fn = self.plan.step(i)
        reads = [self.slots[self.buffers.slot_of[b]] for b in sg.reads]
        if self.capturing:
            entry = self.graphs.get(id(sg))
            if entry is None:
                entry = self._capture(sg, fn, reads)
            if entry is not None:
                entry[0].replay()
                return entry[1]
        out = fn(*self.static_in, *reads)
        self._store(sg, out)
        return list(out[:sg.n_outputs])

    def _store(self, sg: Any, out: Any) -> None:
        """Copy the blocks step ``sg`` writes into their slots (inside a capture: recorded in the graph)."""
        for b, v in zip(sg.writes, out[sg.n_outputs:]):
            self.slots[self.buffers.slot_of[b]].copy_(v)  # type: ignore[index]

    def _capture(self, sg: Any, fn: Callable, reads: list[torch.Tensor]) -> tuple[Any, list[Any]] | None:
        assert self.static_in is not None and self.slots is not None
        n = sg.n_outputs
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, autotuning, workspaces
                for _ in range(2):
                    fn(*self.static_in, *reads)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            before = torch.cuda.memory_reserved(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = fn(*self.static_in, *reads)
                self._store(sg, out)
            self.pool_bytes += torch.cuda.memory_reserved(self.device) - before
        except Exception as e:  # noqa: BLE001 - any capture failure means: run without graphs
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"maskc: CUDA graph capture failed ({self.failed}); this trace runs without CUDA graphs, "
                          "on the same static buffers", stacklevel=4)
            return None
        entry = (g, list(out[:n]))
        self.graphs[id(sg)] = entry
        return entry

    def report(self) -> dict[str, Any]:
        b = self.buffers
        return {"cuda_graphs": len(self.graphs), "capture_failed": self.failed,
                "static_cache_bytes": b.bytes_shared, "static_cache_bytes_unshared": b.bytes_unshared,
                "static_slots": len(b.slot_spec),
                "static_input_bytes": sum(t.numel() * t.element_size() for t in self.static_in or []),
                "graph_pool_bytes": self.pool_bytes}
