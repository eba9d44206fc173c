"""Rewrite: one mask row -> a GraphModule in which skipped blocks are cache reads.

Functional form (no state, so any compiler can take it):

    step_gm(*flat_tensor_inputs, *[cached value of b for b in reads])
        -> (*flat_outputs, *[output of b for b in writes])

Invariants:
- A block that the row skips is not called: its ``call_module`` node is replaced by
  a placeholder ``cache__<block>`` fed with the block's cached output.
- The module returns the original outputs followed by the outputs of ``writes``
  (blocks that run and whose value some later step reads).
- Dead code is eliminated: glue that only fed skipped blocks, and executed blocks
  whose output reaches neither the outputs nor ``writes``, are gone; so are cache
  placeholders nobody uses. ``reads`` and ``runs`` list what survived.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterable

import torch.fx as fx

__all__ = ["StepGraph", "rewrite_step"]


@dataclass
class StepGraph:
    """One specialized step: the module and its calling convention."""

    gm: fx.GraphModule
    n_inputs: int  # flat tensor inputs of the original model
    n_outputs: int  # flat outputs of the original model
    reads: tuple[str, ...]  # blocks read from the cache, in argument order
    writes: tuple[str, ...]  # blocks whose outputs are returned after the outputs
    runs: tuple[str, ...]  # blocks that execute, in graph order


def _safe(name: str) -> str:
    return "cache__" + re.sub(r"\W", "_", name)


def rewrite_step(
    gm: fx.GraphModule,
    block_nodes: dict[str, str],
    skip: Iterable[str],
    writes: Iterable[str],
) -> StepGraph:
    """Specialize ``gm`` (a capture) for one step: ``skip`` become cache reads, ``writes`` are returned."""
    skip = set(skip)
    writes = [b for b in block_nodes if b in set(writes)]  # graph order, deterministic
    if skip & set(writes):
        raise ValueError(f"blocks both skipped and written: {sorted(skip & set(writes))}")
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_inputs = len(placeholders)
    output = next(n for n in graph.nodes if n.op == "output")
    orig_out = output.args[0]
    n_outputs = len(orig_out)

    reads_ph: dict[str, fx.Node] = {}
    anchor = placeholders[-1] if placeholders else None
    for b in block_nodes:  # graph order
        if b not in skip:
            continue
        node = nodes[block_nodes[b]]
        if anchor is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                ph = graph.placeholder(_safe(b))
        else:
            with graph.inserting_after(anchor):
                ph = graph.placeholder(_safe(b))
        anchor = ph
        ph.meta["maskc_read"] = b
        node.replace_all_uses_with(ph)
        graph.erase_node(node)
        reads_ph[b] = ph

    output.args = (tuple(orig_out) + tuple(nodes[block_nodes[b]] for b in writes),)
    out_gm = fx.GraphModule(gm, graph, class_name="MaskedStep")
    out_gm.graph.eliminate_dead_code()
    reads = []
    for b, ph in reads_ph.items():
        if ph.users:
            reads.append(b)
        else:
            out_gm.graph.erase_node(ph)
    runs = tuple(n.meta["maskc_block"] for n in out_gm.graph.nodes if n.op == "call_module" and "maskc_block" in n.meta)
    out_gm.recompile()
    return StepGraph(out_gm, n_inputs, n_outputs, tuple(reads), tuple(writes), runs)
