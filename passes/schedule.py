"""Schedule: liveness across steps -> one StepGraph per step, the write sets and cache lifetimes.

Given a capture and mask bits ``m[T, B]``, walk the steps backwards:

- a block's output at step i is *written* iff some later step j reads it from the
  cache (the read survives dead-code elimination at j) before the block runs again;
- step i's graph is ``rewrite_step`` of its row with those writes, so whatever that
  graph then reads at step i is what earlier steps must write.

Invariants:
- the cache only ever holds values some later step reads (not "every executed block");
- ``drop_after[i]`` lists the cache entries whose last read is at step i or that are
  never read again after i, so the runtime frees each value right after its last use;
- identical (row, writes) pairs share one StepGraph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maskc.errors import EmptyCacheError
from maskc.passes.rewrite import StepGraph, rewrite_step

__all__ = ["Schedule", "schedule", "check_reads_filled"]


@dataclass
class Schedule:
    """The per-step plan for one capture and one mask."""

    steps: list[StepGraph]  # steps[i] is the graph of step i (shared objects where equal)
    drop_after: list[tuple[str, ...]]  # cache entries to free once step i finishes


def check_reads_filled(bits: torch.Tensor, names: list[str]) -> None:
    """Refuse a mask that skips a block before its first execution (reads an empty cache)."""
    T, B = bits.shape
    ran = torch.cumsum(bits.to(torch.int64), dim=0) > 0
    bad = (~bits) & (~ran)
    if bad.any():
        i, b = (int(v) for v in bad.nonzero()[0])
        raise EmptyCacheError(
            f"mask skips block {names[b]!r} at step {i}, but it has not run at any earlier step, "
            "so its cache is empty. Expected row 0 to run every block that a later row skips; "
            "set those bits to 1, or pass the mask through maskc.rectify() which fixes and reports this."
        )


def schedule(capture, bits: torch.Tensor, names: list[str]) -> Schedule:
    """Plan every step of a generation for ``capture`` under mask ``bits`` (bool [T, B])."""
    T, B = bits.shape
    check_reads_filled(bits, names)
    col = {n: j for j, n in enumerate(names)}
    order = [b for b in capture.block_nodes if b in col]
    pending = {b: False for b in order}  # a later step reads b's current value
    steps: list[StepGraph | None] = [None] * T
    reads_at: list[set[str]] = [set() for _ in range(T)]
    memo: dict[tuple, StepGraph] = {}
    for i in range(T - 1, -1, -1):
        row = bits[i]
        skip = tuple(b for b in order if not bool(row[col[b]]))
        writes = tuple(b for b in order if bool(row[col[b]]) and pending[b])
        key = (skip, writes)
        sg = memo.get(key)
        if sg is None:
            sg = rewrite_step(capture.gm, capture.block_nodes, skip, writes)
            memo[key] = sg
        steps[i] = sg
        reads_at[i] = set(sg.reads)
        for b in order:
            if bool(row[col[b]]):
                pending[b] = False
            elif b in reads_at[i]:
                pending[b] = True
    # Cache lifetimes: the entry (b written at step w) dies after its last read.
    last_read: dict[tuple[str, int], int] = {}
    writer: dict[str, int] = {}
    for i in range(T):
        sg = steps[i]
        assert sg is not None
        for b in sg.reads:
            last_read[(b, writer[b])] = i
        for b in sg.writes:
            writer[b] = i
            last_read[(b, i)] = i  # written but possibly never read: dies after i
    drops: list[list[str]] = [[] for _ in range(T)]
    for (b, _w), r in last_read.items():
        drops[r].append(b)
    drop_after = [tuple(sorted(d, key=order.index)) for d in drops]
    return Schedule(steps=[s for s in steps if s is not None], drop_after=drop_after)


def cache_timeline(sched: Schedule, nbytes: dict[str, int]) -> list[int]:
    """Bytes the cache holds during each step: entries alive before it plus its writes."""
    held: dict[str, int] = {}
    during: list[int] = []
    for i, sg in enumerate(sched.steps):
        for b in sg.writes:
            held[b] = nbytes.get(b, 0)
        during.append(sum(held.values()))
        for b in sched.drop_after[i]:
            held.pop(b, None)
    return during
