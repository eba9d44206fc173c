"""Rectify: liveness on the block graph unrolled over steps (T x B) -> a mask with no dead runs.

An execution of block b at step i is *needed* iff its value is read
- at step i: by the output, or by a consumer v (edge b -> v) whose own execution
  at step i is needed; or
- at a later step j, before b runs again, where b is skipped and its cached value
  is read in the same sense.

Exact rectification (the default) turns every unneeded execution off and provably
changes no output: what it removes is read by nothing. It also turns on row 0 for
every block skipped there (a read of an empty cache), and it keeps the first run
of a block that a later row skips (the empty-cache rule forbids skipping it).
Every change is reported with its reason. The result is a fixed point: rectifying
it again changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

__all__ = ["Change", "rectify_bits"]


@dataclass(frozen=True)
class Change:
    step: int
    block: str
    turned: str  # "on" or "off"
    rule: str
    why: str

    def __str__(self) -> str:
        return f"step {self.step}, {self.block}: turned {self.turned} ({self.rule}: {self.why})"


def rectify_bits(bits: torch.Tensor, names: list[str], graph: nx.DiGraph) -> tuple[torch.Tensor, list[Change]]:
    """Exact rectification of ``bits`` (bool [T, B]) over ``graph`` (see the module docstring)."""
    missing = [n for n in names if n not in graph]
    if missing:
        from maskc.errors import MaskMismatchError

        raise MaskMismatchError(
            f"mask block {missing[0]!r} is not in the block graph; build the graph from the same model and blocks"
        )
    bits = bits.clone()
    T, B = bits.shape
    col = {n: j for j, n in enumerate(names)}
    changes: list[Change] = []
    for b in names:
        j = col[b]
        if not bits[0, j] and not bool(bits[:, j].all()):
            bits[0, j] = True
            changes.append(Change(0, b, "on", "empty-cache", "skipped before it ever ran; row 0 must run it"))
    # Blocks of the graph that are not in the mask always run.
    topo = [n for n in nx.topological_sort(graph) if n not in ("input", "output")]
    rtopo = list(reversed(topo))
    succ = {n: [v for v in graph.successors(n)] for n in topo}
    to_output = {n: graph.has_edge(n, "output") for n in topo}
    first_run = {b: int(bits[:, col[b]].nonzero()[0]) for b in names}
    skipped_later = {b: bool((~bits[first_run[b] + 1 :, col[b]]).any()) for b in names}
    pending = {b: False for b in names}
    out = bits.clone()
    for i in range(T - 1, -1, -1):
        needed: dict[str, bool] = {}
        for b in rtopo:
            runs = bool(bits[i, col[b]]) if b in col else True
            demand = to_output[b] or any(needed.get(v, False) for v in succ[b])
            if b not in col:
                needed[b] = demand
                continue
            if runs:
                need = demand or pending[b]
                if not need and i == first_run[b] and skipped_later[b]:
                    need = True  # keep: later rows skip b, its cache must have been filled
                needed[b] = need
                pending[b] = False
                if not need:
                    out[i, col[b]] = False
                    changes.append(Change(i, b, "off", "dead", "its output is read by nothing at this or a later step"))
            else:
                needed[b] = False
                if demand:
                    pending[b] = True
    changes.sort(key=lambda c: (c.step, col[c.block]))
    return out, changes


def _stage(name: str) -> str:
    """The stage a block belongs to: its name up to the first index (``up_blocks.2``, ``blocks.3``)."""
    parts = name.split(".")
    for k, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: k + 1])
    return parts[0]


def heuristic_bits(bits: torch.Tensor, names: list[str], rules: tuple[str, ...]) -> tuple[torch.Tensor, list[Change]]:
    """Opt-in rules beyond liveness (they change outputs); each turns runs off, never on.

    - ``isolated-run``: a run isolated in time and depth (the block is skipped at the steps
      before and after, and its neighbours in execution order are skipped at this step) is
      skipped too: the mask judged everything around it stable. Isolation in time alone is
      not enough: it would erase every full step of a periodic (DeepCache) schedule.
    - ``stage-skipped``: if every other block of a stage is skipped at a step, the last one
      is skipped as well: blocks of one stage change together.
    """
    unknown = set(rules) - set(RULES)
    if unknown:
        from maskc.errors import MaskcError

        raise MaskcError(f"unknown rectification rules {sorted(unknown)}; known: {list(RULES)}")
    bits = bits.clone()
    T, B = bits.shape
    changes: list[Change] = []
    ran_before = torch.cumsum(bits.to(torch.int64), dim=0) - bits.to(torch.int64) > 0
    if "isolated-run" in rules:
        orig = bits.clone()
        for i in range(1, T - 1):
            for j in range(B):
                alone_in_time = bool(orig[i, j]) and not orig[i - 1, j] and not orig[i + 1, j]
                alone_in_depth = not any(bool(orig[i, k]) for k in (j - 1, j + 1) if 0 <= k < B)
                if alone_in_time and alone_in_depth and ran_before[i, j]:
                    bits[i, j] = False
                    changes.append(Change(i, names[j], "off", "isolated-run", RULES["isolated-run"]))
    if "stage-skipped" in rules:
        stages: dict[str, list[int]] = {}
        for j, n in enumerate(names):
            stages.setdefault(_stage(n), []).append(j)
        for i in range(1, T):
            for cols in stages.values():
                on = [j for j in cols if bits[i, j]]
                if len(cols) > 1 and len(on) == 1 and ran_before[i, on[0]]:
                    bits[i, on[0]] = False
                    changes.append(Change(i, names[on[0]], "off", "stage-skipped", RULES["stage-skipped"]))
    return bits, changes


RULES = {
    "isolated-run": "a lone run in time and depth: the block was judged stable all around it",
    "stage-skipped": "every other block of its stage is skipped: blocks of a stage change together",
}
