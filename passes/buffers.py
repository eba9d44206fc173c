"""Buffers: a schedule's cache entries -> static storage slots (for CUDA graphs).

A CUDA graph reads and writes fixed addresses, so the cache of a captured generation
is a set of static buffers: every step variant reads block ``b`` from ``slot[b]`` and
copies ``b``'s new output into it. A variant is shared by several steps, so a block
keeps one slot for the whole generation; the entries of one block never overlap in
time (a block's new value is written only after the old one's last read), so one slot
per block always suffices.

Two blocks may share a slot when their outputs have the same shape and dtype and their
live intervals never meet. An entry written at step w and last read at step r is live
on the closed interval [w, r]: at step w it is copied in at the end of the step, at
step r it is read during it, so an entry ending at step i and another starting at step
i conflict (the step would read one and overwrite it with the other).

Pure functions of the schedule and the block output specs; no tensors are allocated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BufferPlan", "live_intervals", "plan_buffers"]


@dataclass
class BufferPlan:
    """Block -> slot, each slot's spec, and the bytes with and without sharing."""

    slot_of: dict[str, int]
    slot_spec: list[Any]  # (shape, dtype) of each slot
    bytes_shared: int
    bytes_unshared: int


def live_intervals(sched: Any) -> dict[str, list[tuple[int, int]]]:
    """For each cached block, the closed step intervals [write step, last read step] of its entries."""
    out: dict[str, list[tuple[int, int]]] = {}
    open_at: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, sg in enumerate(sched.steps):
        for b in sg.reads:
            last[b] = i
        for b in sg.writes:
            if b in open_at:
                out.setdefault(b, []).append((open_at[b], last.get(b, open_at[b])))
            open_at[b] = i
            last[b] = i
    for b, w in open_at.items():
        out.setdefault(b, []).append((w, last.get(b, w)))
    return out


def _meet(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(s1 <= e2 and s2 <= e1 for s1, e1 in a for s2, e2 in b)


def plan_buffers(sched: Any, specs: dict[str, Any], nbytes: dict[str, int], share: bool = True) -> BufferPlan:
    """Assign every cached block a slot; blocks of equal spec whose intervals never meet may share one.

    ``specs[b]`` is any hashable description of b's output (shape and dtype), ``nbytes[b]`` its size.
    Greedy by first write (interval-graph colouring per spec, optimal for one interval per block).
    """
    intervals = live_intervals(sched)
    order = sorted(intervals, key=lambda b: (intervals[b][0][0], b))
    slot_of: dict[str, int] = {}
    slot_spec: list[Any] = []
    members: list[list[str]] = []
    for b in order:
        for k, spec in enumerate(slot_spec):
            if share and spec == specs[b] and not any(_meet(intervals[b], intervals[o]) for o in members[k]):
                slot_of[b] = k
                members[k].append(b)
                break
        else:
            slot_of[b] = len(slot_spec)
            slot_spec.append(specs[b])
            members.append([b])
    shared = sum(nbytes[m[0]] for m in members)
    return BufferPlan(slot_of, slot_spec, shared, sum(nbytes[b] for b in order))
